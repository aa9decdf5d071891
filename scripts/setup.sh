#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv with the pinned dev requirements, then the
# extension built in place (CUDA kernels too whenever nvcc is present, GPU or not).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import gaea_ext; print('gaea_ext built:', gaea_ext.build_info())"
