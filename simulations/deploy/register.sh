#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (the operator's machine, flwr CLI).
# Adds the connection "fedrec" (address + the CA to trust) to $FLWR_HOME/config.toml
# if it is not there yet, then registers each key; prints each node's id.
#
# usage: simulations/deploy/register.sh SUPERLINK_ADDRESS CA_CERT KEY.pub [KEY.pub ...]
#   SUPERLINK_ADDRESS  host:port as in the server certificate, e.g. superlink.example.org:8000
#   CA_CERT            the ca.crt of `fedrec certs create`
#   KEY.pub            supernodes/node-<i>.pub, one per device
set -euo pipefail
source "$(dirname "$0")/common.sh"
ADDR=${1:?usage: register.sh SUPERLINK_ADDRESS CA_CERT KEY.pub [KEY.pub ...]}
CA=$(cd "$(dirname "${2:?CA_CERT missing}")" && pwd)/$(basename "$2")
shift 2
[ $# -gt 0 ] || { echo "error: give at least one KEY.pub" >&2; exit 2; }
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
CONF=$FLWR_HOME/config.toml
mkdir -p "$FLWR_HOME"
if ! grep -q '^\[superlink\.fedrec\]' "$CONF" 2>/dev/null; then
  [ -f "$CONF" ] || printf '[superlink]\ndefault = "fedrec"\n' > "$CONF"
  printf '\n[superlink.fedrec]\naddress = "%s"\nroot-certificates = "%s"\n' "$ADDR" "$CA" >> "$CONF"
fi
for pub in "$@"; do
  flwr supernode register "$pub" fedrec
done
