#!/usr/bin/env bash
# Create a virtual environment, install the project with its dev tools, lint, type-check and test.
# Works on a fresh Linux machine without a GPU (the Triton kernels run through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Override on GPU hosts.
pip install -q "torch==${POLYLORA_TORCH_VERSION:-2.13.0}"
# web and ray: the examples' tests (tests/test_examples.py) run them, Ray Serve included.
pip install -q -e '.[dev,web,ray]'
ruff check .
mypy
HF_HUB_OFFLINE=1 python -m pytest -m "not gpu" "$@"
