#!/usr/bin/env bash
# The README's result tables (recommender v2): every row's result file, ml-100k, seeds
# 0,1,2 (train.seed; the split is fixed by data.split-seed 0), in two lanes side by side
# (one per core). Federated rows use the in-process engine (the same ServerApp and
# ClientApp exchanging real Flower Messages, without Ray) to fit on 2 cores. Rows not
# rerun here (FedMF, the text-only federated row, the earlier-default federated rows)
# are labelled "earlier protocol" by report.py.
#
#   simulations/results_v2.sh            # then: python simulations/report.py
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
F=.venv/bin/fedrec
SIM="$F simulate --engine inprocess --seeds 0,1,2"
# The ID-only peers' own recipe (4 local epochs, one constant server lr): the default
# schedule is the text + ID model's and leaves SASRec over IDs far behind (docs/federated.md).
ID_RECIPE="fed.server-lr=0.01 fed.server-lr-warmup=0 fed.server-lr-decay='none' fed.server-lr-ids=1 train.local-epochs=4"
mkdir -p runs results/tie-item-id
$F data fetch ml-100k
lane_a() {
  $F train-central --seeds 0,1,2 --quiet --save-dir runs/central-seq+id --json results/central-seq+id.json
  $F train-central --seeds 0,1,2 --quiet --run-config "model.item-text=false" --json results/central-seq-id.json
  $F baseline popularity --json results/popularity.json
  $F baseline text-similarity --json results/text-similarity.json
  # the same two models under the earlier tie rule (README, "Tie order")
  $F train-central --seeds 0,1,2 --quiet --run-config "data.tie-order='item-id'" --json results/tie-item-id/central-seq+id.json
  $F train-central --seeds 0,1,2 --quiet --run-config "data.tie-order='item-id' model.item-text=false" --json results/tie-item-id/central-seq-id.json
  $F train-central --seeds 0,1,2 --quiet --run-config "model.id-embeddings=false" --json results/central-seq.json
}
lane_b() {
  # the default: text + ID items, 2 local epochs, server lr warmup + cosine decay, ID tables x2
  $SIM --runs-dir runs/fed-seq+id-sched --json results/fed-seq+id-sched.json
  $SIM --run-config "model.item-text=false $ID_RECIPE" --runs-dir runs/fed-seq-id --json results/fed-seq-id.json
}
lane_a > runs/results_v2.a.log 2>&1 &
lane_b > runs/results_v2.b.log 2>&1 &
wait
.venv/bin/python simulations/plot_rounds.py results/fed-seq+id-sched.json \
  results/fed-seq-id.json --central results/central-seq+id.json \
  --out results/rounds.png
# explanations, diversity (judged over genres) and new-item rules of the default models
M=runs/fed-seq+id-sched/seed-0,runs/fed-seq+id-sched/seed-1,runs/fed-seq+id-sched/seed-2
$F diversity-curve --model $M --similarity genres --lambdas 0,0.01,0.02,0.03,0.05,0.08,0.1,0.15 --json results/diversity.json
$F diversity-curve --model $M --similarity genres --method dpp --lambdas 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7 --json results/diversity-dpp.json
$F explain-eval --model $M --json results/explain.json
.venv/bin/python simulations/new_items.py --model $M --json results/new-items.json
.venv/bin/python simulations/new_items.py --model runs/central-seq+id/seed-0,runs/central-seq+id/seed-1,runs/central-seq+id/seed-2 --offsets 0,0.5,0.75,1,1.25,1.5,1.75,2 --json results/new-items-central.json
# the independent reference (its own venv; about an hour per seed on 2 cores)
.venv/bin/python simulations/recbole_sasrec.py --seeds 0 --json results/recbole-sasrec.json
.venv/bin/python simulations/plot_diversity.py results/diversity.json results/diversity-dpp.json --out results/diversity.png
bash simulations/recommend_example.sh
