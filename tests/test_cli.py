"""`shardserve serve` as an operator runs it: its own local Ray cluster, requests answered (its flags applied),
SIGTERM stops it."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from shardserve import LLM, SamplingParams
from shardserve.cli import build_parser, main, model_specs
from shardserve.cluster.ray_cluster import _haproxy_config, _processes, haproxy_available
from shardserve.router.spec import ModelSpec
from shardserve.router.tool_tags import ToolStrictLevel

GENERATION_DEFAULTS = {"top_k": 1, "max_new_tokens": 5}
PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and of Italy, Rome."

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux: /proc and SCHED_BATCH")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter ("Z": a zombie) and parent pid; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _state_and_parent(pid)
    return stat is not None and stat[0] != "Z"


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process descended from `root`."""
    parent, command = {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        stat = _state_and_parent(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat is not None and stat[0] != "Z":
            parent[pid], command[pid] = stat[1], cmdline

    def descends(pid: int) -> bool:
        while pid in parent:
            pid = parent[pid]
            if pid == root:
                return True
        return False
    return {pid: cmd for pid, cmd in command.items() if descends(pid)}


def _policies(pid: int) -> list[int]:
    policies = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies.append(os.sched_getscheduler(int(tid)))
        except OSError:  # the thread ended meanwhile
            pass
    return policies


def test_serve_flags_are_model_spec_fields_and_bad_ones_fail_before_a_cluster_starts(monkeypatch, lora_dirs):
    """Each engine flag lands in the replica's engine config; a flag left out keeps ModelSpec's default (the
    CLI has none of its own); a value the engine refuses ends the command before Ray is started."""
    flags = ["--max-num-batched-tokens", "64", "--block-size", "32", "--no-enable-prefix-caching", "--seed", "3",
             "--revision", "r1", "--trust-remote-code", "--kv-cache-memory-bytes", "1000000",
             "--cuda-graph-sizes", "1", "2", "--hf-overrides", '{"rope_theta": 5.0}', "--max-num-seqs", "7",
             "--num-cpus-per-worker", "2", "--generation-config", "vllm",
             "--override-generation-config", '{"top_k": 3}',
             "--max-logprobs", "-1", "--scheduling-policy", "priority",
             "--structured-outputs-config", '{"disable_any_whitespace": true}',
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
             "--tool-strict-level", "parameter",
             "--enable-lora", "--lora-modules", f"ad={lora_dirs('llama')}", "--max-loras", "2", "--max-lora-rank", "8",
             "--max-cpu-loras", "3"]
    specs = model_specs(build_parser().parse_args(["serve", "a", "b", "--served-model-name", "x", *flags]))
    assert [s.name for s in specs] == ["x", "b"]
    config = specs[1].engine_config()
    assert (config.max_num_batched_tokens, config.block_size, config.enable_prefix_caching, config.seed) == \
        (64, 32, False, 3)
    assert (config.revision, config.trust_remote_code, config.kv_cache_memory_bytes) == ("r1", True, 1000000)
    assert (config.cuda_graph_sizes, config.hf_overrides, config.max_num_seqs, config.num_cpus_per_worker) == \
        ([1, 2], {"rope_theta": 5.0}, 7, 2.0)
    assert (config.generation_config, config.override_generation_config, config.max_logprobs) == \
        ("vllm", {"top_k": 3}, -1)
    assert (config.scheduling_policy, config.structured_outputs_config) == \
        ("priority", {"disable_any_whitespace": True})
    assert type(specs[1].tool_parser()).__name__ == "HermesToolParser" and config.reasoning_parser == "qwen3"
    assert specs[1].tool_strict() == ToolStrictLevel.PARAMETER
    monkeypatch.setenv("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")   # read where the spec is made
    assert model_specs(build_parser().parse_args(["serve", "a", *flags]))[0].tool_strict() is None
    monkeypatch.delenv("VLLM_ENFORCE_STRICT_TOOL_CALLING")
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (True, 2, 8, 3)
    assert specs[1].lora_requests()["ad"].lora_path == lora_dirs("llama")
    args = build_parser().parse_args(["serve", "--allowed-origins", '["https://a.example"]', "--allowed-credentials"])
    assert (args.allowed_origins, args.allowed_credentials) == (["https://a.example"], True)
    (plain,) = model_specs(build_parser().parse_args(["serve", "a"]))
    assert plain == ModelSpec(model="a")

    monkeypatch.setattr("shardserve.cluster.ray_cluster.connect", lambda address: pytest.fail("Ray was started"))
    for bad in (["--max-num-batched-tokens", "0"], ["--block-size", "0"], ["--tensor-parallel-size", "0"],
                ["--structured-outputs-config", '{"backend": "outlines"}'], ["--enable-auto-tool-choice"],
                ["--lora-modules", f"ad={lora_dirs('llama')}"],
                ["--enable-lora", "--max-lora-rank", "2", "--lora-modules", f"ad={lora_dirs('llama')}"]):
        with pytest.raises(SystemExit,
                           match=r"shardserve serve: error: .*(must be|is not available|requires|greater than)"):
            main(["serve", "a", *bad])
    for bad in (["--hf-overrides", "[1]"], ["--allowed-origins", '"*"'], ["--scheduling-policy", "lifo"],
                ["--tool-call-parser", "mistral"], ["--reasoning-parser", "granite"], ["--tool-strict-level", "x"]):
        with pytest.raises(SystemExit):  # argparse's own: not a JSON object / list, not a choice
            main(["serve", "a", *bad])


def test_serve_answers_keeps_its_cluster_off_the_engine_and_stops_on_sigterm(model_dirs):
    """The cluster `shardserve serve` starts runs SCHED_BATCH, except a CPU replica's engine thread and its
    OpenMP team, and its bookkeeping (Serve's controller, Ray's agents), which runs SCHED_IDLE; SIGTERM (docker
    stop, Kubernetes) shuts the app and the cluster down as Ctrl-C does."""
    port = _free_port()
    # Its own cluster, not the tests' (nor their HAProxy's ports: the server picks its own)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_HAPROXY_")}
    # Replica ports of its own: the test session's cluster may be running beside it.
    env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT="31100", RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT="31200",
               RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT="41100", RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT="41200")
    # As another Ray Serve on this machine would: HAProxy's default metrics and stats ports are taken
    taken = []
    for default in (9101, 8404):
        taken.append(socket.socket())
        with contextlib.suppress(OSError):  # already taken: all the same
            taken[-1].bind(("", default))
            taken[-1].listen()
    server = subprocess.Popen(
        [sys.executable, "-m", "shardserve", "serve", model_dirs("llama"), "--served-model-name", "cli",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
         "--stream-interval", "3", "--max-num-batched-tokens", "8", "--block-size", "32", "--no-enable-prefix-caching",
         "--override-generation-config", json.dumps(GENERATION_DEFAULTS),
         "--num-cpus", str(len(os.sched_getaffinity(0)))],  # the model on every core: a hand-off replica
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = []
        for line in server.stdout:  # start-up: the cluster, the app, then the line saying where it listens
            output.append(line)
            if line.startswith("shardserve is listening"):
                break
        assert server.poll() is None, "".join(output)
        # A prompt of several 8-token chunks (--max-num-batched-tokens 8) answers as the offline engine does.
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "cli", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert r.json()["usage"]["prompt_tokens"] > 3 * 8
        offline = LLM(model_dirs("llama"), dtype="float32", max_model_len=128,
                      override_generation_config=GENERATION_DEFAULTS)
        expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
        assert r.json()["choices"][0]["text"] == expected
        # What a request leaves out comes from the generation config (top_k 1: sampled, yet the best token); a
        # completion's null max_tokens is its default, 16, as in vLLM (the config's max_tokens is for chat's).
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "cli", "prompt": PROMPT, "max_tokens": None})
        defaults = offline.get_default_sampling_params().clone(max_tokens=16)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16
        assert r.json()["choices"][0]["text"] == offline.generate(PROMPT, defaults, use_tqdm=False)[0].outputs[0].text
        body = {"model": "cli", "prompt": "Hello", "max_tokens": 7, "temperature": 0, "ignore_eos": True,
                "logprobs": 1, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        # --stream-interval 3: the first token at once, then three at a time (reports a late stream joins)
        assert set(itertools.accumulate(len(e["choices"][0]["logprobs"]["tokens"]) for e in events)) <= {1, 4, 7}
        assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events) == 7

        started = _descendants(server.pid)
        replicas = [pid for pid, cmd in started.items() if cmd.startswith("ray::ServeReplica")]
        cluster = [pid for pid, cmd in started.items() if "raylet" in cmd or "gcs_server" in cmd]
        assert len(replicas) == 1 and cluster, started
        for pid in cluster:
            assert set(_policies(pid)) == {os.SCHED_BATCH}, started[pid][:100]
        # Answered above with the bookkeeping idle: it runs only on cores nothing else wants.
        bookkeeping = [pid for pid, cmd in started.items() if cmd.startswith("ray::ServeController")
                       or any(w.endswith(("DashboardAgent", "dashboard/agent.py")) for w in cmd.split()[:3])]
        assert len(bookkeeping) == 2, started
        for pid in bookkeeping:
            assert set(_policies(pid)) == {os.SCHED_IDLE}, started[pid][:100]
        on_path = [pid for pid, cmd in started.items() if "haproxy" in cmd.lower()]  # HAProxy and its manager
        for pid in on_path:
            assert os.SCHED_IDLE not in _policies(pid), started[pid][:100]
        replica = _policies(replicas[0])
        # The engine thread and its team (two threads on two cores, one more per extra core) stay SCHED_OTHER.
        assert replica.count(os.SCHED_OTHER) >= 2 and replica.count(os.SCHED_BATCH) > replica.count(os.SCHED_OTHER)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only what the server started changed

        server.send_signal(signal.SIGTERM)
        rest = server.communicate(timeout=60)[0]
        assert server.returncode == 0 and "Shutting down." in rest, rest
        # Ray's agents leave once their own polling finds the raylet gone: on a loaded 2-core machine that has
        # taken over 30 s (CI, 2026-12-04)
        deadline = time.monotonic() + 60
        while left := [pid for pid in started if _alive(pid)]:
            assert time.monotonic() < deadline, f"still running after SIGTERM: {[started[p] for p in left]}"
            time.sleep(0.5)
        # nor an HAProxy that a reload during the shutdown started (it kept the port: the next start failed)
        configs = {_haproxy_config(cmd) for cmd in started.values()} - {None}
        assert configs or not haproxy_available()
        assert not [cmd for cmd in _processes()[1].values() if _haproxy_config(cmd) in configs]
    finally:
        for sock in taken:
            sock.close()
        if server.poll() is None:  # a failed check: take the whole tree down, HAProxy included
            for pid in [*_descendants(server.pid), server.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
