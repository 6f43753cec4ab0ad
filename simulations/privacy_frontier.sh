#!/usr/bin/env bash
# The privacy frontier on the current protocol (docs/privacy.md, "The frontier"):
#   1. dp_popularity: the private reference (user-level DP popularity) and the private
#      recommender built on it (the same release + each device's own PLM text profile),
#      for each unit (user, block) and ε in {8, 4, 2, 1}, about a minute each; each
#      user-unit file also carries a membership-inference audit of its release;
#   2. trained: the DP-trained federated model (DP-FedAvg, user unit, ε 8/4/2/1; DP-SGD,
#      block unit, ε 8), seeds 0,1,2, the earlier sweep's recipe (20 rounds of 94
#      devices, 2 local epochs; see privacy_v2.sh) on today's model and split;
#   3. ftrl: correlated noise (DP-FTRL tree aggregation) at ε 8, user unit, seeds 0,1,2;
#      profile: the private recommender as a trained model's start (model.kind =
#      "profile"), ε 8 in all (its release's ε composed), seeds 0,1,2;
#   4. frontier: `fedrec audit` on the releases behind the ε-8 points, then
#      results/privacy-frontier.json and its plot, then the report blocks.
#
#   simulations/privacy_frontier.sh [dp_popularity|trained|ftrl|profile|frontier]...
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/privacy-frontier}
OUT=results/privacy-frontier
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
FEDREC=.venv/bin/fedrec
BASE="fed.num-rounds=20 fed.eval-every=20 train.local-epochs=2 privacy.accountant='prv' fed.server-lr=0.01 fed.server-lr-warmup=0 fed.server-lr-decay='none' fed.server-lr-ids=1"
USER_CFG="privacy.max-grad-norm=0.25"
BLOCK_CFG="privacy.max-grad-norm=1.0 train.local-epochs=1 fed.sampling='balanced' privacy.accountant='rdp'"
mkdir -p "$RUNS" "$OUT"

dp_popularity() {
  for unit in user block; do
    for e in 8 4 2 1; do
      $FEDREC baseline popularity --unit $unit --epsilon $e --json "$OUT/dp-popularity-$unit-eps$e.json"
      $FEDREC baseline popularity --unit $unit --epsilon $e --device-text \
        --json "$OUT/dp-prior-device-text-$unit-eps$e.json"
    done
  done
}

sweep() {  # UNITS EPSILONS NAME [extra user overrides]
  $FEDREC privacy-sweep --run-config "$BASE" --user-run-config "$USER_CFG ${4:-}" \
    --block-run-config "$BLOCK_CFG" --units "$1" --epsilons "$2" --seeds 0,1,2 \
    --runs-dir "$RUNS/$3" --json "$OUT/$3.json"
}

trained() {  # two halves side by side, one core each (inf: the recipe without DP)
  (sweep user inf,8,4,2 trained-user-a) > "$RUNS/trained-a.log" 2>&1 &
  (sweep user 1 trained-user-b; sweep block 8 trained-block) > "$RUNS/trained-b.log" 2>&1 &
  wait
}

TREE="privacy.mode='user' privacy.noise='tree' fed.sampling='balanced'"
ftrl() {  # the same recipe with the tree's correlated noise: FedAdam, and FedAvg (whose
  #         linear step keeps the tree's telescoping: the model carries one prefix's noise)
  (sweep user 8 ftrl-fedadam "$TREE") > "$RUNS/ftrl-a.log" 2>&1 &
  (sweep user 8 ftrl-fedavg "$TREE fed.strategy='fedavg'") > "$RUNS/ftrl-b.log" 2>&1 &
  wait
}

PROFILE="model.kind='profile' model.dim=16 model.new-item-bias=-30.0 model.prior='$OUT/dp-prior-device-text-user-eps4.json'"
profile() {  # the release at ε 4 (it spends what its rule chose) + DP-FedAvg for the rest of
  #           ε 8: the private recommender as the trained model's starting point; ε = inf:
  #           the same model and recipe without DP in training (the release is still there)
  $FEDREC privacy-sweep --run-config "$BASE $PROFILE" --user-run-config "privacy.max-grad-norm=0.05" \
    --units user --epsilons inf,8 --seeds 0,1,2 --runs-dir "$RUNS/profile-eps8" \
    --json "$OUT/profile-eps8.json" > "$RUNS/profile.log" 2>&1
  # 100 rounds, seed 0: does it learn with more rounds, with and without DP?
  $FEDREC privacy-sweep --run-config "${BASE/fed.num-rounds=20 fed.eval-every=20/fed.num-rounds=100 fed.eval-every=20} $PROFILE" \
    --user-run-config "privacy.max-grad-norm=0.05" --units user --epsilons inf,8 --seeds 0 \
    --runs-dir "$RUNS/profile-r100" --json "$OUT/profile-r100.json" >> "$RUNS/profile.log" 2>&1
  # centralized, no DP: how far the model family itself moves from its start
  $FEDREC train-central --seeds 0 --quiet --run-config "$PROFILE" \
    --json "$OUT/central-profile.json" >> "$RUNS/profile.log" 2>&1
}

frontier() {  # the audits of the releases behind ε 8's points, then the file and tables
  # (the one-release recommender's, and the ε-4 release the profile model starts from)
  for e in 8 4; do
    $FEDREC audit --model "$OUT/dp-prior-device-text-user-eps$e.json" \
      --json "$OUT/audit-release-eps$e.json" > /dev/null
  done
  .venv/bin/python simulations/privacy_frontier.py
  .venv/bin/python simulations/report.py
}

for step in "${@:-dp_popularity trained ftrl profile frontier}"; do
  for s in $step; do "$s"; done
done
