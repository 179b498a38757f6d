#!/usr/bin/env bash
# Fresh machine -> the main job: install into .venv, then serve the default model on a local Ray cluster
# (OpenAI-compatible HTTP on 127.0.0.1:8000) until interrupted. Arguments go to `shardserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/shardserve serve "$@"
