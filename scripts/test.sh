#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite (unit + integration on SmolLM2-135M).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q --durations=15 "$@"
