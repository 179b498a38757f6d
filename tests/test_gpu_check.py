"""`scripts/gpu-check.sh` runs its tests once, on a lent GPU machine whose Python has torch, Triton, transformers,
tokenizers, safetensors, pytest and peft, but none of the serving stack (Ray, Serve's FastAPI and pydantic, gguf,
xgrammar, the API clients). Nothing it runs may need those: checked here, on the CPU, with them made missing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script_list(name: str) -> list[str]:
    """A bash array of the script's, `NAME=(a b c)`."""
    match = re.search(rf"^\s*{name}=\(([^)]*)\)", (REPO / "scripts" / "gpu-check.sh").read_text(), re.M)
    return match.group(1).split()


GPU_CHECK_TESTS = _script_list("KERNEL_TESTS") + _script_list("ENGINE_TESTS")
NOT_ON_THE_GPU_MACHINE = ["ray", "fastapi", "starlette", "uvicorn", "pydantic", "gguf", "xgrammar", "openai", "cohere"]

_MISSING = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


def test_the_gpu_checks_tests_need_nothing_the_gpu_machine_lacks(tmp_path):
    """Every test gpu-check.sh runs is collected, and those that build an engine on a CPU run, with the serving
    stack's packages missing (a meta-path finder that says so, loaded before anything as sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(_MISSING.format(names=set(NOT_ON_THE_GPU_MACHINE)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    check = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert "No module named 'ray'" in check.stderr  # the finder works
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *GPU_CHECK_TESTS], cwd=REPO, env=env, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert " tests collected" in collected.stdout
    for name in GPU_CHECK_TESTS:  # the lists name files, each collected
        assert name + "::" in collected.stdout, name
    engines = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_attention_backends.py::test_engine_takes_the_backend_it_is_given",
                              "tests/test_moe.py::test_experts_adapters_match_each_token_through_its_adapters_merged_"
                              "experts"], cwd=REPO, env=env, capture_output=True, text=True)
    assert engines.returncode == 0, engines.stdout[-3000:] + engines.stderr[-3000:]


def test_the_profile_runs_without_the_serving_stack_and_labels_every_host_phase(tmp_path):
    """`gpu-check.sh profile` wraps the engine's phases by name from the benchmark: a renamed method would only
    show on the GPU machine. Its CPU smoke run here, with the serving stack missing as there."""
    (tmp_path / "sitecustomize.py").write_text(_MISSING.format(names=set(NOT_ON_THE_GPU_MACHINE)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    run = subprocess.run([sys.executable, "benchmarks/gpu_profile.py", "--smoke", "--out", str(tmp_path / "out")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for batch in (4, 1):  # both batch sizes on one engine
        section = run.stdout.split(f"## tiny, batch {batch},")[1].split("trace:")[0]
        for phase in ("schedule", "prepare inputs", "forward (eager)", "sampling batch", "sample",
                      "wait + read tokens", "process outputs"):
            assert f"| {phase} | " in section, section
        assert (tmp_path / "out" / f"trace-tiny-b{batch}.json.gz").stat().st_size > 0


def test_the_gemv_benchmark_runs_in_the_interpreter_without_the_serving_stack(tmp_path):
    """`gpu-check.sh gemv`: its CPU smoke run (Triton's interpreter) checks the engine's GEMV kernel, plain, with
    the norm and with SwiGLU, against the default path and writes its report, with the serving stack missing as
    on the GPU machine."""
    (tmp_path / "sitecustomize.py").write_text(_MISSING.format(names=set(NOT_ON_THE_GPU_MACHINE)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    run = subprocess.run([sys.executable, "benchmarks/gpu_gemv.py", "--smoke", "--json-out", str(tmp_path / "g.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "g.json").read_text())
    assert {(s["rows"], s["projection"]) for s in report["shapes"]} == {
        (rows, proj) for rows in (1, 4) for proj in ("norm + tiny", "norm + tiny gated", "tiny")}
    for shape in report["shapes"]:
        assert shape["best"] is not None, shape   # every config ran and agreed with the default path
        assert all(isinstance(diff, float) for _, diff in shape["gemv"].values()), shape


def test_the_kernel_tests_shards_split_a_file_between_them():
    """gpu-check.sh runs each kernel test file as SHARDS processes (SHARDSERVE_TEST_SHARD=i/n, tests/conftest.py):
    together they run every test of the file, each once."""
    def collect(shard: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "SHARDSERVE_TEST_SHARD"}
        env.update({"SHARDSERVE_TEST_SHARD": shard} if shard else {})
        run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/test_fused_kernels.py"], cwd=REPO, env=env, capture_output=True, text=True)
        return [line for line in run.stdout.splitlines() if "::" in line]
    whole = collect(None)
    shards = [collect(f"{i}/3") for i in range(3)]
    assert len(whole) > 6 and all(shards)
    assert sorted(sum(shards, [])) == sorted(whole)


def test_the_benchmark_runs_without_the_serving_stack(tmp_path):
    """`gpu-check.sh bench`: gpu.py's whole flow at toy sizes on the CPU (every peer the script names, the mix,
    the tables), with the serving stack missing as on the GPU machine."""
    (tmp_path / "sitecustomize.py").write_text(_MISSING.format(names=set(NOT_ON_THE_GPU_MACHINE)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    script = (REPO / "scripts" / "gpu-check.sh").read_text()
    peers = re.search(r"benchmarks/gpu\.py --peers (\S+)", script).group(1)
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--peers", peers, "--json-out",
                          str(tmp_path / "b.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())["models"]["tiny"]
    assert set(report) == set(peers.split(","))
    assert all("tok_s" in result and "tpot_ms" in result for result in report.values()), report
    assert report["shardserve"]["mix"]["output_tok_s"] > 0
    assert "| tiny |" in run.stdout and "ShareGPT-like mix" in run.stdout
