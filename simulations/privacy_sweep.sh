#!/usr/bin/env bash
# The README's privacy-budget table and plot (issue #4): ml-100k, text model with
# model.pooling = "none" (h_u = the user-local embedding, so the interaction-level ε holds
# without assumptions, and DP-SGD takes the direct ghost-norm path) and model.dim = 32,
# 50 rounds of 94 devices, FedAdam, PRV accountant, ε in {inf, 8, 4, 2, 1} for both units
# of privacy, seeds 0,1,2.
#
#   simulations/privacy_sweep.sh            # RUNS=<dir> to keep the runs elsewhere
#
# Settings, each chosen by single-seed runs at ε = 8 (README, results/privacy-tuning):
# - no DP: 5 local epochs of batches of 32, server lr 0.03 (the best of 0.01 / 0.03 / 0.05);
# - interaction (DP-SGD on the device): C = 1 on each row's gradient (about the median
#   per-row norm); batch 256 with 1 local epoch, i.e. one full-history step per round
#   (as good as batches of 32 for 2 epochs at a sixth of the DP-SGD work); server lr 0.01;
#   fed.sampling = 'balanced': devices train in a seeded order, k at a time in turn, so
#   each joins the ceil(T k / N) rounds its sigma is solved for and none declines a round
#   for lack of budget (with uniform sampling about half of a late round's devices did);
# - user (DP-FedAvg): 5 local epochs, C = 0.03 on each whole update (about 0.6 of the
#   non-private run's median update norm, its results.json "update-norm-median");
#   server lr 0.1: FedAdam's steps are normalised by the noise, so larger ones pay off.
# model.dim 32 rather than 64: the noise on the aggregate grows with the number of
# federated parameters; the non-private run loses a little, the user-level one gains more
# (results/privacy-tuning: n-d32*, u-d32* against n-e5, u-e5, user-c0015-lr01).
# Two halves run side by side (one per core); the last command reuses every finished
# cell and writes the one table (results/privacy_sweep.json) and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-$HOME/.cache/fedrec/runs/privacy-sweep-d32b}
export OMP_NUM_THREADS=1
sweep() {
  .venv/bin/fedrec privacy-sweep --run-config "model.pooling='none' model.dim=32 fed.num-rounds=50 fed.eval-every=25 train.local-epochs=5 fed.server-lr=0.03 privacy.accountant='prv'" \
    --interaction-run-config "privacy.max-grad-norm=1.0 train.batch-size=256 train.local-epochs=1 fed.server-lr=0.01 fed.sampling='balanced'" \
    --user-run-config "privacy.max-grad-norm=0.03 fed.server-lr=0.1" --runs-dir "$RUNS" "$@"
}
sweep --units user --epsilons inf,8,4,2,1 --seeds 0,1,2 > "$RUNS.a.log" 2>&1 &
sweep --units interaction --epsilons 8,4,2,1 --seeds 0,1,2 > "$RUNS.b.log" 2>&1 &
wait
sweep --units interaction,user --epsilons inf,8,4,2,1 --seeds 0,1,2 \
  --json results/privacy_sweep.json --plot results/privacy_sweep.png
