"""Our block-quantized matmul (backend/serving/q4_kernel.cpp): build it, load it, pack GGUF blocks for it, call it.

The kernel is plain C++ with AVX512-VNNI intrinsics, compiled here by the system's C++ compiler the first
time it is needed (~2 s) into a directory of the caller's choice (the model cache directory), keyed by a hash of
its source and flags, and loaded with ctypes: no Python headers or torch headers, so the build is quick.
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

SOURCES = [Path(__file__).with_name(n) for n in ("decode_layer.cpp", "q4_kernel.cpp")]  # the first includes the second
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512vnni", "-mf16c", "-mfma"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}  # as /proc/cpuinfo names them
TILE_BYTES = {"Q4_1": 256, "Q8_0": 512}  # per 16 rows x 32 inputs

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}


class Matrix(ctypes.Structure):
    """decode_layer.cpp's `Matrix`: one packed matrix."""
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("q8", ctypes.c_int)]


def cpu_supported() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return CPU_FLAGS <= set(flags)


def digest() -> str:
    """Names the build and the packing kept on disk: a change to the sources, the flags or `pack` renames both."""
    text = b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode() + inspect.getsource(pack).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def library_path(build_dir: Path) -> Path:
    return Path(build_dir) / f"q4_kernel-{digest()}.so"


def build(build_dir: Path) -> Path:
    """Compile the kernel into build_dir (once; atomic rename, so concurrent builders do not clash)."""
    path = library_path(build_dir)
    if path.exists():
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        try:
            proc = subprocess.run([cxx, *FLAGS, str(SOURCES[0]), "-o", str(out)], capture_output=True, text=True,
                                  timeout=300, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} took over 300 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)
    return path


def load(build_dir: Path) -> ctypes.CDLL | None:
    """The kernel library (built on first use), or None where it cannot run here (the reason is logged)."""
    if not cpu_supported():
        log.info("q4 kernel: this CPU lacks one of %s; using torch's int4 kernel", sorted(CPU_FLAGS))
        return None
    with _lock:
        try:
            path = build(build_dir)
            if path not in _loaded:
                lib = ctypes.CDLL(str(path))
                for fn in (lib.q4_matmul, lib.q8_matmul):
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
                    fn.restype = ctypes.c_int
                i, f, p, m = ctypes.c_int, ctypes.c_float, ctypes.c_void_p, Matrix
                for fn in (lib.decode_layer, lib.decode_layer_f16):  # float32 / float16 KV cache
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


class BlockLinear:
    """x float32 [M, K] -> float32 [M, N] = x @ W.T on packed blocks (see `pack`; the kind follows from
    the bytes per tile)."""

    def __init__(self, lib: ctypes.CDLL, weights: torch.Tensor, scales: torch.Tensor):
        NT, KB, nbytes = weights.shape
        kind = next((k for k, n in TILE_BYTES.items() if n == nbytes), None)
        if kind is None or tuple(scales.shape) != (NT, KB, 32 if kind == "Q4_1" else 16):
            raise ValueError(f"not packed q4 kernel operands: weights {tuple(weights.shape)}, scales {tuple(scales.shape)}")
        self.fn = lib.q4_matmul if kind == "Q4_1" else lib.q8_matmul
        self.weights, self.scales = weights.contiguous(), scales.contiguous()
        self.N, self.K = NT * 16, KB * 32
        self.matrix = Matrix(self.weights.data_ptr(), self.scales.data_ptr(), int(kind == "Q8_0"))

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
                     torch.get_num_threads())
        if rc:
            raise RuntimeError(f"q4 kernel failed (code {rc}) on input {tuple(x.shape)}")
        return y
