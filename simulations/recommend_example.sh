#!/usr/bin/env bash
# README's on-device recommendation example (results/recommend_example.txt): user 1's
# device directory and `fedrec recommend` on the first seed of the headline federated
# row, by score and re-ranked for diversity. Run after simulations/results_v2.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 COLUMNS=110
F=.venv/bin/fedrec
RUN=runs/fed-seq+id-sched/seed-0
out=results/recommend_example.txt
tmp=$(mktemp)
{
  echo "\$ fedrec device prepare --out runs/dev-user1 --user 1"
  $F device prepare --out runs/dev-user1 --user 1 > /dev/null
  for extra in "" " --diversity 0.06"; do
    echo "\$ fedrec recommend --history runs/dev-user1/history.csv --model $RUN -k 10$extra"
    $F recommend --history runs/dev-user1/history.csv --model $RUN -k 10 $extra
  done
} > "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
