#!/usr/bin/env bash
# Fresh machine -> the main job: install into .venv, then generate with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/shardserve generate "$@"
