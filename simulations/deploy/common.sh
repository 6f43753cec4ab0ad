# Sourced by the deploy scripts: the repository's venv first on PATH (Flower starts its
# helpers - flower-superexec, flwr-serverapp, flwr-clientapp - by name) and Flower's
# environment switches. Override FEDREC_VENV to use another environment.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FEDREC_VENV=${FEDREC_VENV:-$REPO/.venv}
PY=$FEDREC_VENV/bin/python
export PATH="$FEDREC_VENV/bin:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never `uv sync` an app at run time
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1           # the PLM is a local directory
