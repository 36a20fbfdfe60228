#!/usr/bin/env bash
# Regenerate fed_dfkd/proto/ from protos/ (the generated code is committed, never edited by hand).
#
# The output is byte-stable only under the pinned generator (grpcio-tools 1.81.1, libprotoc 33.5;
# constraints.txt); tests/unit/test_protos.py regenerates into a temporary folder and fails on
# any difference. Uses $PYTHON, else the project's .venv, else python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
    python_bin="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python_bin=.venv/bin/python
else
    python_bin=python3
fi

"$python_bin" -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. protos/fed_dfkd/proto/v1/*.proto

# protoc writes no __init__.py; these make the output an importable package.
printf '"""Code generated from protos/ by scripts/gen_protos.sh. Do not edit."""\n' \
    > fed_dfkd/proto/__init__.py
printf '"""Code generated from protos/fed_dfkd/proto/v1 by scripts/gen_protos.sh. Do not edit."""\n' \
    > fed_dfkd/proto/v1/__init__.py
