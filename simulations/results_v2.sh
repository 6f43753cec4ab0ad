#!/usr/bin/env bash
# The README's result tables (recommender v2): every row's result file, ml-100k, seeds
# 0,1,2 (train.seed; the split is fixed by data.split-seed 0), in two lanes side by side
# (one per core; this session ran the seeds of fed-seq+id, fed-seq+id-e2 and fed-seq-id as
# side-by-side `--seeds N` processes and summarized them with `fedrec simulate --resume
# DIR0,DIR1,DIR2 --json FILE`, the command their files record). Federated rows use the in-process engine (the same ServerApp and
# ClientApp exchanging real Flower Messages, without Ray) to fit on 2 cores.
#
#   simulations/results_v2.sh            # then: python simulations/report.py
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
F=.venv/bin/fedrec
SIM="$F simulate --engine inprocess --seeds 0,1,2"
OLD="fed.server-lr=0.01 fed.server-lr-warmup=0 fed.server-lr-decay='none' fed.server-lr-ids=1"
E4="train.local-epochs=4"
mkdir -p runs
$F data fetch ml-100k
lane_a() {
  $F baseline popularity --json results/popularity.json
  $F baseline text-similarity --json results/text-similarity.json
  $F train-central --seeds 0,1,2 --quiet --json results/central-seq+id.json
  $F train-central --seeds 0,1,2 --quiet --run-config "model.id-embeddings=false" --json results/central-seq.json
  $F train-central --seeds 0,1,2 --quiet --run-config "model.item-text=false" --json results/central-seq-id.json
  $F train-central --seeds 0,1,2 --quiet --config simulations/configs/fedmf.toml --json results/central-fedmf.json
  # the default: text + ID items, 2 local epochs, server lr warmup + cosine decay, ID tables x2
  $SIM --runs-dir runs/fed-seq+id-sched --json results/fed-seq+id-sched.json
  # the rows below ran before those defaults: one constant server lr 0.01 (OLD), and 4 local
  # epochs (E4, which helps the text-only model) or 2
  $SIM --run-config "$OLD train.local-epochs=2" --runs-dir runs/fed-seq+id-e2 --json results/fed-seq+id-e2.json
  $SIM --run-config "$OLD $E4" --runs-dir runs/fed-seq+id --json results/fed-seq+id.json
}
lane_b() {
  $SIM --run-config "$OLD $E4 model.id-embeddings=false" --runs-dir runs/fed-seq --json results/fed-seq.json
  $SIM --run-config "$OLD $E4 model.item-text=false" --runs-dir runs/fed-seq-id --json results/fed-seq-id.json
  # one seed: the weakest peer (README), to fit the session's time
  $F simulate --engine inprocess --seeds 0 --config simulations/configs/fedmf.toml --run-config "$OLD $E4" --runs-dir runs/fed-fedmf --json results/fed-fedmf.json
}
lane_a > runs/results_v2.a.log 2>&1 &
lane_b > runs/results_v2.b.log 2>&1 &
wait
.venv/bin/python simulations/plot_rounds.py results/fed-seq+id-sched.json results/fed-seq.json \
  results/fed-seq-id.json results/fed-fedmf.json --central results/central-seq+id.json \
  --out results/rounds.png
# explanations and diversity of the headline federated model (README)
M=runs/fed-seq+id-sched/seed-0,runs/fed-seq+id-sched/seed-1,runs/fed-seq+id-sched/seed-2
$F explain-eval --model $M --json results/explain.json
$F diversity-curve --model $M --lambdas 0,0.02,0.04,0.06,0.08,0.1,0.12,0.15 --json results/diversity.json
$F diversity-curve --model $M --method dpp --lambdas 0,0.5,0.6,0.65,0.7,0.75,0.8,0.85 --json results/diversity-dpp.json
.venv/bin/python simulations/plot_diversity.py results/diversity.json results/diversity-dpp.json --out results/diversity.png
bash simulations/recommend_example.sh
