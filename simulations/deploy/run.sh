#!/usr/bin/env bash
# Launch training on the deployment (operator's machine, after register.sh) and report
# the outcome: `flwr run` exits 0 even when a run fails, so results.json decides.
#
# usage: simulations/deploy/run.sh RUN_CONFIG_TOML
#   RUN_CONFIG_TOML  overrides such as simulations/deploy/deploy.toml: fed.min-nodes > 0,
#                    data.dataset = the server's catalog, fed.run-dir = an absolute path
set -euo pipefail
source "$(dirname "$0")/common.sh"
CFG=$(cd "$(dirname "${1:?usage: run.sh RUN_CONFIG_TOML}")" && pwd)/$(basename "$1")
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
cd "$REPO"
flwr run . fedrec --run-config "$CFG" --stream
"$PY" - "$CFG" <<'PYEOF'
import json, sys, tomllib
from pathlib import Path
with open(sys.argv[1], "rb") as fh:
    cfg = tomllib.load(fh)
run_dir = Path(cfg.get("fed.run-dir") or cfg.get("fed", {}).get("run-dir", ""))
try:
    status = json.loads((run_dir / "results.json").read_text())["status"]
except (OSError, ValueError, KeyError):
    status = "missing"
print(f"run directory {run_dir}: status {status}")
sys.exit(0 if status == "completed" and (run_dir / "final.safetensors").is_file() else 1)
PYEOF
