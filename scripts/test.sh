#!/usr/bin/env bash
# Fresh machine -> the test suite: install into .venv with the test extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
