"""The package's C kernels for CPUs (shardserve/csrc), compiled together into one library.

The library is built once per machine with the system C compiler (-O3 -march=native, OpenMP) into a cache
directory and loaded with ctypes; where no compiler is found, `lib()` is None and layers keep their torch
paths. What each kernel computes: paged decode attention (layers/attention/cpu_backend.py), the fused
elementwise steps of a decoder layer (layers/fused_kernels.py), and the experts' GEMMs of a mixture of experts
at decode sizes (layers/fused_moe.py). Not a kernel, but OpenMP-built with them: the
parking of the engine thread's OpenMP team between steps (workers/cpu_openmp.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from shardserve.cache import cache_dir

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
DTYPES = (torch.float32, torch.bfloat16)  # the tensors' dtypes the kernels read and write
_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int  # pointer, size, float, threads
# name -> ctypes argument types, in the C signatures' order
SIGNATURES = {
    "paged_decode_attention": [_P] * 6 + [_I] * 7 + [_F, _I, _F, _I, _T],
    "store_kv": [_P] * 5 + [_I] * 9 + [_T],
    "rms_norm": [_P] * 5 + [_I] * 4 + [_F, _I, _T],
    "rotary_neox": [_P] * 4 + [_I] * 10 + [_T],
    "gated_act_and_mul": [_P] * 2 + [_I] * 5 + [_T],
    "moe_grouped_gemm": [_P] * 4 + [_I] * 4 + [_T],
    "moe_route": [_P] + [_I] * 4 + [_P] * 3,
    "moe_combine": [_P] * 4 + [_I] * 2 + [_T],
    "park_openmp_workers": [_I] * 3 + [_T],
}
RESTYPES = {"park_openmp_workers": _I}  # the others return nothing
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_signature() -> str:
    """What -march=native depends on: a build is only reused on a CPU with the same features (a shared home
    directory across a cluster's nodes must not hand an AVX-512 build to a CPU without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL:
    sources = sorted(_CSRC.glob("*.c"))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast"]
    digest = hashlib.sha256(" ".join([compiler, *flags, _cpu_signature()]).encode())
    for path in sorted(_CSRC.glob("*.[ch]")):
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_dir("kernels") / f"shardserve_kernels_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, *map(str, sources), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True)
            os.replace(built, target)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(target))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = RESTYPES.get(name), argtypes
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be built (see `build_error`)."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as e:
            _error = getattr(e, "stderr", None) or str(e)
    return _lib


def available() -> bool:
    return lib() is not None


def build_error() -> str | None:
    lib()
    return _error
