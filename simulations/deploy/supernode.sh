#!/usr/bin/env bash
# Start one device's SuperNode: trusts the CA, authenticates with its own private key,
# and points the ClientApp at the device directory (fedrec.deployment.device documents it:
# history.csv + items.csv; catalog embeddings are cached in DEVICE_DIR/cache).
#
# usage: simulations/deploy/supernode.sh SUPERLINK_ADDRESS CA_CERT NODE_KEY DEVICE_DIR [PORT]
#   NODE_KEY  supernodes/node-<i> (private, mode 0600; its .pub must be registered)
#   PORT      the SuperNode's local runtime API on 127.0.0.1 (default 9094; distinct for
#             SuperNodes sharing a host)
# Optional: MODEL_DIR=/path/to/plm (default: the run's encoder.model-dir, else the bundled
# MiniLM), CATALOG=/path/to/items.csv (default: DEVICE_DIR). The device's clock must be
# within a few minutes of the SuperLink's. FLWR_HOME defaults to DEVICE_DIR/.flwr.
set -euo pipefail
source "$(dirname "$0")/common.sh"
USAGE="usage: supernode.sh SUPERLINK_ADDRESS CA_CERT NODE_KEY DEVICE_DIR [PORT]"
ADDR=${1:?$USAGE}; CA=${2:?$USAGE}; KEY=${3:?$USAGE}
DEV=$(cd "${4:?$USAGE}" && pwd)
PORT=${5:-9094}
[ -f "$DEV/history.csv" ] || { echo "error: $DEV/history.csv not found" >&2; exit 2; }
NODE_CONFIG="data-dir='$DEV'"
[ -z "${MODEL_DIR:-}" ] || NODE_CONFIG="$NODE_CONFIG model-dir='$MODEL_DIR'"
[ -z "${CATALOG:-}" ] || NODE_CONFIG="$NODE_CONFIG catalog='$CATALOG'"
export FLWR_HOME=${FLWR_HOME:-$DEV/.flwr}
mkdir -p "$FLWR_HOME"
exec flower-supernode --superlink "$ADDR" --root-certificates "$CA" \
  --auth-supernode-private-key "$KEY" --port "$PORT" --node-config "$NODE_CONFIG"
