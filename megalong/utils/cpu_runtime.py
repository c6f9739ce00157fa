"""Process set-up for CPU runs: glibc's allocator policy and a single-process rendezvous.

Entry points (launch/, tools/) call these with ``os.environ``; the functions read only the mapping
they are given and touch nothing else but the C library.

Why the allocator matters on CPU. glibc serves allocations above its mmap threshold with mmap and
returns them to the kernel on free. The threshold is *dynamic*: each freed mmap'd block raises it to
that block's size (up to 32 MiB on 64-bit), so after the first few activation-sized tensors are
freed, later ones come from the heap, and freed heap memory mostly stays in the process (only the
top of the main heap is trimmed). Measured on a 135M model, fp32, N = 4096: peak RSS grows by
875 KB/token with the default policy against 205 KB/token with a fixed threshold
(docs/BENCHMARKS.md, "CPU allocator")::

    default glibc:  alloc 40 MB ─► mmap ─► free ─► threshold := 40 MB ─► next 40 MB from the heap,
                    freed into the heap, kept resident                     (RSS ≈ every tensor ever)
    fixed (mallopt): alloc ≥ 128 KiB ─► mmap ─► free ─► munmap            (RSS ≈ live tensors)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024
"""Bytes: blocks this large are mmap'd and returned on free (glibc's own initial threshold, kept fixed;
fixing it also fixes the trim threshold at its 128 KiB default)."""
ALLOCATOR_ENV = "MEGALONG_CPU_MALLOC"
"""``auto`` (default: chosen from the run's activation size), ``fixed`` or ``glibc`` (leave glibc's
dynamic policy alone)."""
AUTO_BLOCK_BYTES = 64 * 2**20
"""``auto``: fix the threshold when a micro-batch's activations per rank — tokens × the widest layer
output (the MLP's intermediate) × bytes × layers — reach this; below it glibc's default policy.
Measured (docs/BENCHMARKS.md, "CPU allocator"): the fixed threshold costs up to 1.6× on the
quickstart's steps (4 layers × 4 MiB = 16 MiB), while glibc's default held 1.8× the plan for a
24-layer 135M model already at N = 1024 (24 × 6 MiB = 144 MiB) and 3.5× at N = 4096."""


def activation_block_bytes(micro_batch: int, seq_len: int, sp: int, width: int, dtype_bytes: int,
                           layers: int = 1) -> int:
    """Bytes of ``layers`` (micro-batch, this rank's tokens, ``width``) activation tensors."""
    return micro_batch * -(-seq_len // max(1, sp)) * width * dtype_bytes * layers


_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 matrix instructions (Cooper Lake / Sapphire Rapids and later,
Zen 4+); without them PyTorch's bf16 matmuls convert to fp32 and back (emulated)."""


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """True when this machine's CPU has bf16 matrix instructions (or when /proc/cpuinfo is unreadable:
    nothing to warn about then)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(f in flags for f in BF16_CPU_FLAGS)


def configure_cpu_allocator(env: Mapping[str, str], block_bytes: int | None = None) -> str:
    """Fix glibc's mmap threshold for this process unless the user chose an allocator policy, or
    (``auto``) the run's activations are small enough that glibc's default policy is the faster one.

    Returns a one-line description of what was done (for the log). An explicit setting wins: any
    ``MALLOC_*_`` tuning variable, an allocator in ``LD_PRELOAD`` or ``MEGALONG_CPU_MALLOC=glibc|fixed``.
    ``block_bytes``: the run's largest activation block per rank (``activation_block_bytes``); None
    (unknown, e.g. a tool) counts as large: the memory-safe choice.
    """
    choice = env.get(ALLOCATOR_ENV, "auto").strip().lower()
    if choice not in ("auto", "fixed", "glibc"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: use 'auto' (default), 'fixed' or 'glibc'")
    if choice == "glibc":
        return f"allocator: glibc's default policy ({ALLOCATOR_ENV}=glibc)"
    preloaded = [lib for lib in _PRELOADED if lib in env.get("LD_PRELOAD", "")]
    if preloaded:
        return f"allocator: {preloaded[0]} from LD_PRELOAD (left as set)"
    user = [k for k in _USER_SETTINGS if k in env]
    if user:
        return f"allocator: glibc tuned by {', '.join(f'{k}={env[k]}' for k in user)} (left as set)"
    if choice == "auto" and block_bytes is not None and block_bytes < AUTO_BLOCK_BYTES:
        return (f"allocator: glibc's default policy (auto: activations of {block_bytes / 2**20:.1f} MiB per rank "
                f"and micro-batch are below {AUTO_BLOCK_BYTES // 2**20} MiB, where it is faster and holds little; "
                f"{ALLOCATOR_ENV}=fixed to fix the threshold anyway)")
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "allocator: not glibc, left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "allocator: mallopt refused, glibc's default policy"
    why = (f"auto: activations of {block_bytes / 2**20:.0f} MiB per rank and micro-batch; " if choice == "auto" and block_bytes
           else "")
    return (f"allocator: glibc with a fixed mmap threshold of {MMAP_THRESHOLD // 1024} KiB ({why}freed activations "
            f"go back to the kernel; {ALLOCATOR_ENV}=glibc turns this off)")


def single_process_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a one-process run, or {} when any of them is already set."""
    if any(k in env for k in RENDEZVOUS):
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
