#!/usr/bin/env bash
# On a GPU machine that already has CUDA torch, transformers, tokenizers, safetensors, triton and pytest (Ray and
# gguf are not needed): the GPU tests, then the GPU benchmark. Runs from the source tree, nothing installed.
# Logs and the benchmark's JSON go to $OUT (default: ./gpu-check-out). A lent GPU's session has ~15 minutes in
# all, so run the halves as two calls on the warm machine, tests first, then the benchmark (~5 min):
#   bash scripts/gpu-check.sh tests      # the GPU tests (Triton kernels compiled, CUDA graphs, bf16 parity)
#   bash scripts/gpu-check.sh bench      # benchmarks/gpu.py: both shapes against transformers, the mix on one
#   bash scripts/gpu-check.sh            # both, one after the other
#   bash scripts/gpu-check.sh kernels    # only the attention kernels' num_warps / tile sweep (gpu_kernels.py)
#   bash scripts/gpu-check.sh gemv       # a decode step's projections at 1-4 rows: cuBLAS + norm/SwiGLU kernels
#                                        # against layers/gemv.py's fused kernel and a sweep of its tiles
#   bash scripts/gpu-check.sh profile    # where a decode step's time goes, both shapes at batch 256 and 1
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mode=${1:-all}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Preflight: the device, and Triton compiling and launching one kernel (it builds its launcher with the
# machine's C compiler): if this fails, every test and measurement after it would too, for the same reason.
# (From a file: Triton reads a kernel's source, which a script on stdin does not have.)
preflight=$(mktemp --suffix=.py)
cat > "$preflight" <<'PY'
import shutil, subprocess, torch, triton, triton.language as tl
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
cc = shutil.which("cc") or shutil.which("gcc")
print("C compiler:", cc and subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0])

@triton.jit
def _add_one(x, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x + i, tl.load(x + i, mask=i < n) + 1, mask=i < n)

x = torch.zeros(1000, device="cuda")
_add_one[(4,)](x, 1000, BLOCK=256)
assert x.eq(1).all().item(), "a Triton kernel ran wrong"
print("Triton compiles and runs")
PY
python3 "$preflight" 2>&1 | tee "$out/device.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
if [ "$mode" = kernels ]; then
    python3 benchmarks/gpu_kernels.py --json-out "$out/gpu-kernels.json" 2>&1 | tee "$out/kernels.log"
    exit "${PIPESTATUS[0]}"
fi
if [ "$mode" = gemv ]; then
    python3 benchmarks/gpu_gemv.py --json-out "$out/gpu-gemv.json" 2>&1 | tee "$out/gemv.log"
    exit "${PIPESTATUS[0]}"
fi
if [ "$mode" = profile ]; then
    status=0
    for model in llama-3.2-1b qwen3-0.6b; do
        python3 benchmarks/gpu_profile.py --model "$model" --batch 256,1 --out "$out" 2>&1 | tee -a "$out/profile.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    exit "$status"
fi
status=0
if [ "$mode" != bench ]; then
    # Most of these tests' time is Triton compiling kernels on the host (16 cores there), so the kernel tests run
    # at once, each file as SHARDS processes (tests/conftest.py); then the tests that build engines, in one
    # process: an engine sizes its KV cache by what the device has free, which other processes would move.
    KERNEL_TESTS=(tests/test_triton_attention.py tests/test_fused_kernels.py tests/test_gemv.py)
    ENGINE_TESTS=(tests/test_gpu.py tests/test_async_scheduling.py tests/test_attention_backends.py tests/test_moe.py)
    SHARDS=4
    scratch=$(mktemp -d)  # the tests' model directories: not under $out, which comes back from the machine
    pids=()
    for file in "${KERNEL_TESTS[@]}"; do
        for ((shard = 0; shard < SHARDS; shard++)); do
            name=$(basename "$file" .py)-$shard
            SHARDSERVE_TEST_SHARD=$shard/$SHARDS python3 -m pytest -q -p no:cacheprovider --durations=5 \
                --basetemp="$scratch/$name" "$file" > "$out/$name.log" 2>&1 &
            pids+=($!)
        done
    done
    for pid in "${pids[@]}"; do
        wait "$pid"
        rc=$?
        [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1  # 5: pytest's "no tests ran", a shard whose tests all skip
    done
    for log in "$out"/test_*-[0-9].log; do echo "== $log"; cat "$log"; done > "$out/tests.log"
    grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed)|^== " "$out/tests.log"  # the whole logs are in $out
    python3 -m pytest -q -p no:cacheprovider --durations=15 --basetemp="$scratch/engines" "${ENGINE_TESTS[@]}" \
        2>&1 | tee -a "$out/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$mode" != tests ]; then
    python3 benchmarks/gpu.py --peers shardserve,shardserve-gemv,transformers --json-out "$out/gpu-bench.json" \
        2>&1 | tee "$out/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit "$status"
