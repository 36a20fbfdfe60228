#!/usr/bin/env bash
# Creates .venv and installs fed-dfkd with every runtime and test dependency in one resolve
# under constraints.txt (torch/torchvision/flwr/opacus/grpcio-tools/protobuf pins).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
log=$(mktemp)
if ! pip install -c constraints.txt -r requirements.txt -e ".[dev]" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -40 >&2
  echo "setup: pip install failed" >&2
  exit 1
fi
rm -f "$log"
pip check
python -c "import torch, torchvision, flwr, opacus; print('torch', torch.__version__, '| flwr', flwr.__version__, '| opacus', opacus.__version__)"
