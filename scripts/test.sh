#!/usr/bin/env bash
# The test command: set everything up (scripts/setup.sh), then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest python_tests -q "$@"
