#!/usr/bin/env bash
# Set up (scripts/install.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest tests "$@"
