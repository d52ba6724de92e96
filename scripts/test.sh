#!/usr/bin/env bash
# The test command: set up everything, then lint (ruff) and run the whole test suite.
# Tests that need ../shared/data skip with a message when it is absent. Extra arguments go to pytest.
set -euo pipefail
KAF_EXTRAS=test
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ruff check .
ruff format --check .
python -m pytest -ra "$@"
