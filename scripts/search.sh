#!/usr/bin/env bash
# The main job: set everything up (scripts/setup.sh), then run a GAEA search. With no
# arguments: GAEA on the embedded handwritten digits, NB201 space, about a minute on a CPU.
# Arguments go to `gaea search` (e.g. --preset paper-cifar10 --data DIR --out RUN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh > /dev/null
exec .venv/bin/gaea search "$@"
