#!/usr/bin/env bash
# Create a virtual environment, install the project and run the demo (no downloads needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==${POLYLORA_TORCH_VERSION:-2.13.0}"
pip install -q -e .
HF_HUB_OFFLINE=1 python -m polylora_async demo "$@"
