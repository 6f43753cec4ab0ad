#!/usr/bin/env bash
# Multimodal items on ml-100k (docs/multimodal.md): text + knowledge graph against text
# alone, each command writing the file its README / docs block reads.
#   1. central: the centralized model with graph features, summed (the default
#      combination) and gated, seeds 0,1,2 (~10 min a seed on 2 cores); text alone is the
#      headline row results/central-seq+id.json;
#   2. federated: the default federated recipe (100 rounds of 94 devices) with graph
#      features, seeds 0,1,2 (~20 min a seed); text alone is results/fed-seq+id-sched.json;
#   3. explain: explain-eval on the federated graph runs (history reasons and graph facts),
#      the on-device example with shared facts, and each graph model at its calibrated
#      new-item offset (simulations/new_items.py; text alone: results/new-items*.json);
#   lever: the graph vector from shared facts only (model.graph-min-items=2), seed 0,
#      centralized and federated;
#   4. bench: image encoding throughput and upload (bench_images.py), the device path
#      with graph features (bench_device.py), then the report blocks.
#
#   simulations/multimodal.sh [central|federated|lever|explain|bench]...
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
F=.venv/bin/fedrec
GRAPH="model.item-features='text,graph'"
mkdir -p results/multimodal

central() {
  $F train-central --seeds 0,1,2 --quiet --save-dir runs/central-seq+id+graph \
    --json results/central-seq+id+graph.json --run-config "$GRAPH"
  $F train-central --seeds 0,1,2 --quiet --save-dir runs/central-seq+id+graph-gate \
    --json results/multimodal/central-seq+id+graph-gate.json \
    --run-config "$GRAPH model.feature-combine='gate'"
}

federated() {
  $F simulate --engine inprocess --seeds 0,1,2 --runs-dir runs/fed-seq+id+graph \
    --json results/fed-seq+id+graph.json --run-config "$GRAPH"
}

lever() {
  SHARED="$GRAPH model.graph-min-items=2"
  $F train-central --seeds 0 --quiet --save-dir runs/central-seq+id+graph-shared \
    --json results/multimodal/central-seq+id+graph-shared.json --run-config "$SHARED"
  $F simulate --engine inprocess --seeds 0 --runs-dir runs/fed-seq+id+graph-shared \
    --json results/multimodal/fed-seq+id+graph-shared.json --run-config "$SHARED"
}

explain() {
  $F explain-eval --model runs/fed-seq+id+graph/seed-0,runs/fed-seq+id+graph/seed-1,runs/fed-seq+id+graph/seed-2 \
    --json results/explain-graph.json
  out=results/multimodal/recommend_example.txt
  tmp=$(mktemp)
  {
    echo "\$ fedrec device prepare --out runs/dev-user1-graph --user 1 --run-config \"$GRAPH\""
    $F device prepare --out runs/dev-user1-graph --user 1 --run-config "$GRAPH" > /dev/null
    echo "\$ fedrec recommend --history runs/dev-user1-graph/history.csv --model runs/fed-seq+id+graph/seed-0 -k 10"
    COLUMNS=140 $F recommend --history runs/dev-user1-graph/history.csv --model runs/fed-seq+id+graph/seed-0 -k 10
  } > "$tmp"
  mv "$tmp" "$out"
  .venv/bin/python simulations/new_items.py \
    --model runs/fed-seq+id+graph/seed-0,runs/fed-seq+id+graph/seed-1,runs/fed-seq+id+graph/seed-2 \
    --json results/multimodal/new-items-fed-graph.json
  .venv/bin/python simulations/new_items.py \
    --model runs/central-seq+id+graph/seed-0,runs/central-seq+id+graph/seed-1,runs/central-seq+id+graph/seed-2 \
    --offsets 0,0.5,0.75,1,1.25,1.5,1.75,2 --json results/multimodal/new-items-central-graph.json
}

bench() {
  OMP_NUM_THREADS=2 .venv/bin/python simulations/bench_images.py
  OMP_NUM_THREADS=2 .venv/bin/python simulations/bench_device.py --run-config "$GRAPH" \
    --out results/bench_device-graph.json
  .venv/bin/python simulations/report.py
}

for part in "${@:-central federated lever explain bench}"; do
  for p in $part; do "$p"; done
done
