#!/usr/bin/env bash
# On a GPU machine that already has CUDA torch, transformers, tokenizers, safetensors and triton (Ray and gguf
# are not needed): the GPU tests, then the GPU benchmark. Runs from the source tree, nothing installed.
# Logs and the benchmark's JSON go to $OUT (default: ./gpu-check-out).
#   bash scripts/gpu-check.sh            # tests + benchmark
#   bash scripts/gpu-check.sh tests      # tests only
#   bash scripts/gpu-check.sh kernels    # only the attention kernels' num_warps / tile sweep (gpu_kernels.py)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
if [ "${1:-all}" = kernels ]; then
    python3 benchmarks/gpu_kernels.py --json-out "$out/gpu-kernels.json" 2>&1 | tee "$out/kernels.log"
    exit "${PIPESTATUS[0]}"
fi
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_attention.py \
    tests/test_fused_kernels.py tests/test_attention_backends.py tests/test_moe.py 2>&1 | tee "$out/tests.log"
status=${PIPESTATUS[0]}
if [ "${1:-all}" != tests ]; then
    python3 benchmarks/gpu.py --json-out "$out/gpu-bench.json" 2>&1 | tee "$out/bench.log"
fi
exit "$status"
