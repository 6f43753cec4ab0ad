#!/usr/bin/env bash
# Privacy-budget experiments on the v2 default model (issue 14; docs/privacy.md):
#   1. the sweep: both units of privacy, ε in {inf, 8, 4, 2, 1}, seeds 0,1,2;
#   2. the population study: the ε = 8 user-level cell and its non-private run on nested
#      user subsets of ml-100k (data.users = 118, 236, 471; 943 is the sweep itself) at the
#      same sample rate q = 0.1, seeds 0,1,2, then the fitted trend;
#   3. the levers, one seed each at ε = 8 against their own non-private run (user unit;
#      two for the block unit); text-only items, the one whose ratio beat the sweep's, with three.
#
#   simulations/privacy_v2.sh [sweep|population|levers|inter_levers|fit|report]...
#                                                    # default: all, in that order
#
# Finished cells are reused, so a killed script continues where it stopped, and parts
# can run at once (SERIAL=1: a part's two halves in turn rather than side by side).
#
# Round budget: 20 rounds of 94 devices (q = 0.1), 2 local epochs, evaluated once at the
# end (the headline run uses 100 rounds of 2 local epochs; 20 x 2 keeps each run to
# about 3.5 minutes on one core, so the 60-odd runs fit in an afternoon on 2 cores).
# PRV accountant, δ = 1e-4 (below 1/943). Each unit has its own settings:
# - user (DP-FedAvg + FedAdam): C = 0.25 on each whole update, about 0.6 x the median
#   update norm of the non-private run after its first rounds (results.json
#   "update-norm-median" ~0.4), server lr 0.01 (see the levers for 0.03);
# - block (DP-SGD over blocks on each device): one local epoch, i.e. one noisy
#   full-history step per round (the noise, not the work, limits it; and DP-SGD costs
#   about 2x plain training per epoch), C = 1 on each block's gradient, balanced sampling
#   so every device spends its whole budget and none declines a round.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/privacy-v2}
OUT=results/privacy-v2
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# the server lr of these runs: one constant 0.01 for every parameter (the default before its
# warmup, cosine decay and the ID tables' multiplier)
BASE="fed.num-rounds=20 fed.eval-every=20 train.local-epochs=2 privacy.accountant='prv' fed.server-lr=0.01 fed.server-lr-warmup=0 fed.server-lr-decay='none' fed.server-lr-ids=1"
USER_CFG="privacy.max-grad-norm=0.25"
INTER_CFG="privacy.max-grad-norm=1.0 train.local-epochs=1 fed.sampling='balanced' privacy.accountant='rdp'"
FEDREC=.venv/bin/fedrec
mkdir -p "$RUNS" "$OUT"

side_by_side() {  # "commands A" "commands B" NAME: A and B on one core each (SERIAL=1: in turn)
  if [ -n "${SERIAL:-}" ]; then eval "$1"; eval "$2"; return; fi
  (eval "$1") > "$RUNS/$3-a.log" 2>&1 &
  (eval "$2") > "$RUNS/$3-b.log" 2>&1 &
  wait
}

sweep_cells() { $FEDREC privacy-sweep --run-config "$BASE" --user-run-config "$USER_CFG" \
  --block-run-config "$INTER_CFG" --runs-dir "$RUNS/sweep" --seeds 0,1,2 "$@"; }

sweep() {  # the sweep; its two halves side by side, then one table from every cell
  side_by_side "sweep_cells --units user --epsilons inf,8,4,2,1" \
               "sweep_cells --units block --epsilons 8,4,2,1" sweep
  sweep_cells --units block,user --epsilons inf,8,4,2,1 \
    --json "$OUT/sweep.json" --plot "$OUT/sweep.png"
}

run_size() {  # N devices-per-round: one population's no-DP and ε = 8 cells, 3 seeds
  $FEDREC privacy-sweep --run-config "$BASE data.users=$1 fed.clients-per-round=$2" \
    --user-run-config "$USER_CFG" --units user --epsilons inf,8 --seeds 0,1,2 \
    --runs-dir "$RUNS/population-$1" --json "$OUT/population-$1.json"
}

population() {  # q = 0.1 at every size: 12, 24, 47 devices per round
  side_by_side "run_size 118 12; run_size 236 24" "run_size 471 47" population
}

fit() {  # the trend, from the three subsets and the sweep (943 users)
  .venv/bin/python simulations/population_study.py "$OUT"/population-{118,236,471}.json \
    "$OUT/sweep.json" --json "$OUT/population.json" --plot "$OUT/population.png"
}

lever() {  # NAME "overrides of both cells" ["overrides of the private cell only"] [seeds]
  if [ -z "$2" ]; then  # the same non-private run as the sweep's: reuse its finished seeds
    for seed in $(echo "${4:-0}" | tr , ' '); do
      [ -d "$RUNS/sweep/none-epsinf/seed-$seed" ] || continue
      mkdir -p "$RUNS/lever-$1/none-epsinf"
      cp -rn "$RUNS/sweep/none-epsinf/seed-$seed" "$RUNS/lever-$1/none-epsinf/"
    done
  fi
  $FEDREC privacy-sweep --run-config "$BASE $2" --user-run-config "$USER_CFG ${3:-}" \
    --units user --epsilons inf,8 --seeds "${4:-0}" --runs-dir "$RUNS/lever-$1" \
    --json "$OUT/lever-$1.json"
}

inter_lever() {  # NAME "overrides of both cells" ["overrides of the private cell only"]
  local same="$RUNS/lever-$1/none-epsinf/seed-0"  # the user lever of that name: same no-DP run
  [ -z "$2" ] && same="$RUNS/sweep/none-epsinf/seed-0"
  if [ -d "$same" ]; then
    mkdir -p "$RUNS/lever-interaction-$1/none-epsinf"
    cp -rn "$same" "$RUNS/lever-interaction-$1/none-epsinf/"
  fi
  $FEDREC privacy-sweep --run-config "$BASE $2" --block-run-config "$INTER_CFG ${3:-}" \
    --units block --epsilons inf,8 --seeds 0 --runs-dir "$RUNS/lever-interaction-$1" \
    --json "$OUT/lever-interaction-$1.json"
}

inter_levers() {  # the unit of one block: fewer federated parameters, a tighter clip
  side_by_side 'inter_lever text-only "model.id-embeddings=false"' \
               'inter_lever clip-0.3 "" "privacy.max-grad-norm=0.3"' inter-levers
}

levers() {
  side_by_side 'lever server-lr-0.03 "" "fed.server-lr=0.03"
                lever clip-0.5 "" "privacy.max-grad-norm=0.5"
                lever adaptive-clipping "" "privacy.clipping='"'"'adaptive'"'"' privacy.max-grad-norm=0.5"
                lever local-epochs-4 "train.local-epochs=4" "privacy.max-grad-norm=0.5"' \
               'lever text-only "model.id-embeddings=false" "" 0,1,2
                lever full-participation "fed.clients-per-round=0 fed.num-rounds=2 fed.eval-every=2"
                lever public-warm-start "model.public-warm-start=5"' \
               levers
}

report() { .venv/bin/python simulations/report.py; }

for step in "${@:-sweep population levers inter_levers fit report}"; do
  for s in $step; do "$s"; done
done
