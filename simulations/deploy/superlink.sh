#!/usr/bin/env bash
# Start the SuperLink (the server machine): HTTPS on one port for the SuperNodes (Fleet
# API), the flwr CLI (Control API) and its own ServerApp process, with SuperNode
# authentication (only keys registered with register.sh get in).
#
# usage: simulations/deploy/superlink.sh CREDS_DIR [HOST] [PORT]
#   CREDS_DIR  from `fedrec certs create --out CREDS_DIR --hosts <public name/IP> --nodes N`;
#              uses ca.crt, server.crt, server.key (server.crt needs SANs for the public
#              name and 127.0.0.1, which `fedrec certs create` always adds)
#   HOST       interface to listen on (default 0.0.0.0; 127.0.0.1 for a local test)
#   PORT       the one HTTPS port (default 8000); open it in the firewall
# State (registered keys, runs) lives in $FLWR_HOME/state.db (default ~/.flwr-superlink).
set -euo pipefail
source "$(dirname "$0")/common.sh"
CREDS=$(cd "${1:?usage: superlink.sh CREDS_DIR [HOST] [PORT]}" && pwd)
HOST=${2:-0.0.0.0}
PORT=${3:-8000}
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr-superlink}
mkdir -p "$FLWR_HOME"
# Fail now with one line (expired, wrong CA, key mismatch, no 127.0.0.1 SAN), not later
# as a failed handshake.
"$PY" -c 'import sys
from fedrec.errors import FedrecError
from fedrec.deployment.transport import check_server_credentials as check
d = sys.argv[1]
try:
    check(f"{d}/ca.crt", f"{d}/server.crt", f"{d}/server.key", ["127.0.0.1"])
except FedrecError as e:
    sys.exit(f"error: {e}")' "$CREDS"
exec flower-superlink \
  --ssl-ca-certfile "$CREDS/ca.crt" --ssl-certfile "$CREDS/server.crt" \
  --ssl-keyfile "$CREDS/server.key" --enable-supernode-auth \
  --host "$HOST" --port "$PORT" --database "$FLWR_HOME/state.db"
