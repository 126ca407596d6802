"""Our block-quantized matmul (backend/serving/q4_kernel.cpp): build it, load it, pack GGUF blocks for it, call it.

The kernel is plain C++ with AVX512-VNNI intrinsics, compiled here by the system's C++ compiler the first
time it is needed (~2-4 s) into a directory of the caller's choice (the model cache directory), keyed by a hash of
its source and flags, and loaded with ctypes: no Python headers or torch headers, so the build is quick.
On a CPU with AVX2 but no AVX512-VNNI the same source is built with -mavx2 and avx2_shim.h runs each
512-bit vector as two 256-bit halves: the same integer math, so the same batch-invariant results.
Its OpenMP loop runs on torch's own libgomp (already loaded by torch, and found first by its soname), so
the two share one thread pool instead of fighting over the cores.

Where it cannot run (no compiler, another CPU, another OS) `load` returns None with the reason logged,
and decoding falls back to torch's int4 kernel (backend/serving/decode_step.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from models.gguf_loader import QuantBlocks

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("decode_layer.cpp", "q4_kernel.cpp", "avx2_shim.h")]  # the first includes the others
COMMON_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
# (name, compiler flags, the CPU flags they need as /proc/cpuinfo names them), the fastest first
VARIANTS = [
    ("avx512vnni", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"],
     {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}),
    ("avx2", ["-mavx2", "-mf16c", "-mfma"], {"avx2", "f16c", "fma"}),
]
TILE_BYTES = {"Q4_1": 256, "Q8_0": 512}  # per 16 rows x 32 inputs

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}


class Matrix(ctypes.Structure):
    """decode_layer.cpp's `Matrix`: one packed matrix."""
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("q8", ctypes.c_int), ("digits", ctypes.c_int)]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def runnable_variants() -> list[str]:
    """The builds this CPU can run, the fastest first (a CPU with AVX512-VNNI runs the AVX2 build too)."""
    have = _cpu_flags()
    return [name for name, _, needs in VARIANTS if needs <= have]


def variant() -> str | None:
    """The build this CPU runs ("avx512vnni" or "avx2"), or None where it runs neither."""
    return next(iter(runnable_variants()), None)


def cpu_supported() -> bool:
    return variant() is not None


def flags(name: str) -> list[str]:
    return COMMON_FLAGS + next(f for n, f, _ in VARIANTS if n == name)


def digest(name: str) -> str:
    """Names the build and the packing kept on disk: a change to the sources, the flags or `pack` renames both."""
    text = b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags(name)).encode() + pack_digest().encode()
    return hashlib.sha256(text).hexdigest()[:16]


def pack_digest() -> str:
    """Names the packed weights kept on disk (one layout for every build): a change to `pack` renames them."""
    return hashlib.sha256(inspect.getsource(pack).encode()).hexdigest()[:16]


def library_path(build_dir: Path, name: str) -> Path:
    return Path(build_dir) / f"q4_kernel-{name}-{digest(name)}.so"


def build(build_dir: Path, name: str) -> Path:
    """Compile the kernel's `name` variant into build_dir (once; atomic rename, so concurrent builders do not clash)."""
    path = library_path(build_dir, name)
    if path.exists():
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        try:
            proc = subprocess.run([cxx, *flags(name), str(SOURCES[0]), "-o", str(out)], capture_output=True, text=True,
                                  timeout=300, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} took over 300 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)
    return path


def load(build_dir: Path, name: str | None = None) -> ctypes.CDLL | None:
    """The kernel library (built on first use; `name`: a build from `runnable_variants`, default the fastest),
    or None where it cannot run here (the reason is logged)."""
    name = name or variant()
    if name is None:
        log.info("q4 kernel: this CPU has neither %s; using torch's int4 kernel",
                 " nor ".join(str(sorted(needs)) for _, _, needs in VARIANTS))
        return None
    if name not in runnable_variants():  # it would die on an illegal instruction, not raise
        log.warning("q4 kernel: this CPU cannot run the %s build; using torch's int4 kernel", name)
        return None
    with _lock:
        try:
            path = build(build_dir, name)
            if path not in _loaded:
                lib = ctypes.CDLL(str(path))
                lib.peak_dpbusd_u4.argtypes, lib.peak_dpbusd_u4.restype = [ctypes.c_int, ctypes.c_longlong], ctypes.c_longlong
                for fn in (lib.q4_matmul, lib.q8_matmul):
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                    fn.restype = ctypes.c_int
                i, f, p, m = ctypes.c_int, ctypes.c_float, ctypes.c_void_p, Matrix
                for fn in (lib.decode_layer, lib.decode_layer_f16, lib.decode_layer_q8):  # float32 / float16 / int8 KV cache
                    fn.argtypes = [p, i, i, f, p, m, m, p, m, m, i, i, i, i, p, p, i, p, p, i, i, p, i]
                    fn.restype = ctypes.c_int
                _loaded[path] = lib
            return _loaded[path]
        except (OSError, RuntimeError) as e:
            log.warning("q4 kernel unavailable (%s); using torch's int4 kernel", e)
            return None


def pack(blocks: QuantBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF blocks -> the kernel's (weights uint8 [N/16, K/32, 256 or 512], scales fp16 [N/16, K/32, 32 or 16]).

    Tiles of 16 output rows n; per block of 32 inputs the kernel reads 64-byte vectors whose byte 4i+c
    belongs to row i of the tile (vpdpbusd sums 4 neighbouring inputs per lane).
    Q4_1: vector v of 4 holds inputs 8v+c (low nibbles) and 8v+4+c (high nibbles); scales = d x 16, then
    m x 16. Q8_0: vector v of 8 holds inputs 4v+c as q + 128 (the unsigned operand); scales = d x 16."""
    if blocks.kind not in TILE_BYTES:
        raise ValueError(f"the q4 kernel runs {tuple(TILE_BYTES)}, not {blocks.kind}")
    N, K = blocks.q.shape
    if N % 16 or K % 32:
        raise ValueError(f"the q4 kernel needs rows % 16 == 0 and inputs % 32 == 0, got {N} x {K}")
    NT, KB = N // 16, K // 32
    q = blocks.q.numpy()
    d = blocks.d.numpy().astype(np.float16).reshape(NT, 16, KB).transpose(0, 2, 1)  # [t, b, i]
    if blocks.kind == "Q4_1":
        q = q.astype(np.uint8).reshape(NT, 16, KB, 4, 2, 4).transpose(0, 2, 3, 1, 5, 4)  # [t, b, v, i, c, h]
        w = q[..., 0] | (q[..., 1] << 4)
        m = blocks.m.numpy().astype(np.float16).reshape(NT, 16, KB).transpose(0, 2, 1)
        scales = np.concatenate([d, m], axis=-1)
    else:
        w = (q.astype(np.int16) + 128).astype(np.uint8).reshape(NT, 16, KB, 8, 4).transpose(0, 2, 3, 1, 4)
        scales = d
    w = np.ascontiguousarray(w).reshape(NT, KB, -1)
    return torch.from_numpy(w), torch.from_numpy(np.ascontiguousarray(scales).view(np.uint16).view(np.int16))


# how the kernel rounds its float inputs (ServeConfig.kernel_activations) -> int8 digits per value: two (~15 bits,
# the default: within a few 1e-5 of float), or one as llama.cpp's q8 activations (half the multiplies: a
# prefill and a batched decode are compute-bound here, ~1.4x faster; ~1e-2 of float)
ACTIVATION_DIGITS = {"int16": 2, "int8": 1}


class BlockLinear:
    """x float32 [M, K] -> float32 [M, N] = x @ W.T on packed blocks (see `pack`; the kind follows from
    the bytes per tile); `activations`: a key of ACTIVATION_DIGITS."""

    def __init__(self, lib: ctypes.CDLL, weights: torch.Tensor, scales: torch.Tensor, activations: str = "int16"):
        if activations not in ACTIVATION_DIGITS:
            raise ValueError(f"activations: one of {', '.join(ACTIVATION_DIGITS)}, not {activations!r}")
        self.digits = ACTIVATION_DIGITS[activations]
        NT, KB, nbytes = weights.shape
        kind = next((k for k, n in TILE_BYTES.items() if n == nbytes), None)
        if kind is None or tuple(scales.shape) != (NT, KB, 32 if kind == "Q4_1" else 16):
            raise ValueError(f"not packed q4 kernel operands: weights {tuple(weights.shape)}, scales {tuple(scales.shape)}")
        self.fn = lib.q4_matmul if kind == "Q4_1" else lib.q8_matmul
        self.weights, self.scales = weights.contiguous(), scales.contiguous()
        self.N, self.K = NT * 16, KB * 32
        self.matrix = Matrix(self.weights.data_ptr(), self.scales.data_ptr(), int(kind == "Q8_0"), self.digits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        M = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.K:
            raise ValueError(f"expected input [M, {self.K}], got {tuple(x.shape)}")
        y = torch.empty(M, self.N)
        if M == 0:
            return y
        rc = self.fn(x.data_ptr(), M, self.K, self.weights.data_ptr(), self.scales.data_ptr(), self.N, y.data_ptr(),
                     torch.get_num_threads(), self.digits)
        if rc:
            raise RuntimeError(f"q4 kernel failed (code {rc}) on input {tuple(x.shape)}")
        return y


def int8_peak_ops(lib: ctypes.CDLL, threads: int, seconds: float = 0.3) -> float:
    """Operations per second (a multiply-add counts 2, as FLOPs do) of the kernels' inner product on this CPU with
    `threads` threads and nothing else: q4_kernel.cpp's peak_dpbusd_u4 timed, the best of 3 runs of ~`seconds`.
    A ceiling for our kernels here, which also unpack, load and scale: a prefill's model FLOPs over it is the
    least time any kernel built on these instructions could take."""
    import time
    macs_per_round = 8 * 64 * threads  # 8 chains of 64 multiply-adds per thread
    rounds = 1 << 16
    while True:  # grow the run until it is long enough to time
        t0 = time.perf_counter()
        lib.peak_dpbusd_u4(threads, rounds)
        dt = time.perf_counter() - t0
        if dt > seconds / 4:
            break
        rounds *= 4
    rounds = max(1, int(rounds * seconds / dt))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        lib.peak_dpbusd_u4(threads, rounds)
        best = min(best, time.perf_counter() - t0)
    return 2 * macs_per_round * rounds / best

