#!/usr/bin/env bash
# The whole deployment on one machine (127.0.0.1), with the scripts above: credentials,
# a TLS SuperLink with SuperNode auth, one SuperNode per ml-100k user given, training,
# then `fedrec recommend` on the first device. Every process started here is stopped
# by pid (with its children) on exit.
#
# usage: simulations/deploy/local.sh [WORK_DIR] [ROUNDS] [USER ...]
#   defaults: a new temp dir, 2 rounds, users 1 and 2 (needs `fedrec data fetch ml-100k`)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/common.sh"
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
ROUNDS=${2:-2}
if [ $# -gt 2 ]; then USERS=("${@:3}"); else USERS=(1 2); fi
PIDS=()

stop_tree() {  # TERM a pid and its descendants, then KILL what is left
  local all=("$1") i=0 kids
  while [ $i -lt ${#all[@]} ]; do
    kids=$(ps -o pid= --ppid "${all[$i]}" 2>/dev/null || true)
    for k in $kids; do all+=("$k"); done
    i=$((i + 1))
  done
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "${all[@]}" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "${all[@]}" 2>/dev/null || true
}
cleanup() { for p in "${PIDS[@]}"; do stop_tree "$p"; done; }
trap cleanup EXIT
free_port() { "$PY" -c 'from fedrec.federation.simulate import free_port; print(free_port())'; }

echo "== credentials and devices in $WORK"
fedrec certs create --out "$WORK/creds" --hosts 127.0.0.1 --nodes ${#USERS[@]} --force > /dev/null
for u in "${USERS[@]}"; do
  fedrec device prepare --out "$WORK/device-$u" --user "$u"
done
mkdir -p "$WORK/catalog"
cp "$WORK/device-${USERS[0]}/items.csv" "$WORK/catalog/items.csv"  # all the server knows

PORT=$(free_port)
echo "== SuperLink on 127.0.0.1:$PORT"
FLWR_HOME=$WORK/superlink "$HERE/superlink.sh" "$WORK/creds" 127.0.0.1 "$PORT" \
  > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 150); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done

export FLWR_HOME=$WORK/cli
"$HERE/register.sh" "127.0.0.1:$PORT" "$WORK/creds/ca.crt" "$WORK"/creds/supernodes/node-*.pub

i=0
for u in "${USERS[@]}"; do
  FLWR_HOME=$WORK/node-$i "$HERE/supernode.sh" "127.0.0.1:$PORT" "$WORK/creds/ca.crt" \
    "$WORK/creds/supernodes/node-$i" "$WORK/device-$u" "$(free_port)" > "$WORK/node-$i.log" 2>&1 &
  PIDS+=($!)
  i=$((i + 1))
done

cat > "$WORK/deploy.toml" <<TOML
"data.dataset" = "$WORK/catalog"
"data.cache-dir" = "$WORK/server-cache"
"fed.min-nodes" = ${#USERS[@]}
"fed.clients-per-round" = 0
"fed.num-rounds" = $ROUNDS
"fed.eval-every" = 1
"fed.run-dir" = "$WORK/run"
TOML
echo "== training: $ROUNDS rounds on ${#USERS[@]} devices"
"$HERE/run.sh" "$WORK/deploy.toml" | grep -E "^round|status|ERROR|failures" || true
[ -f "$WORK/run/final.safetensors" ] || { echo "error: no final parameters; see $WORK/*.log" >&2; exit 1; }

echo "== on device ${USERS[0]}: fedrec recommend"
fedrec recommend --history "$WORK/device-${USERS[0]}/history.csv" --model "$WORK/run" -k 10
