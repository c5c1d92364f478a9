"""Process-level CPU settings: glibc's allocator for tensor-sized blocks, a background
thread's OpenMP team (Linux only: glibc, and the libgomp torch's wheels ship; elsewhere they
do nothing), and whether a core is free for such a thread."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit


def reuse_freed_memory() -> bool:
    """Keep freed tensor memory in the process for the next batch instead of handing it back.

    By default glibc serves blocks above 128 KiB (batches, activations, gradients) with fresh
    mmaps, or trims them from the heap once freed, so every training step pays page faults and
    the kernel's zeroing again. With blocks up to 32 MiB taken from the heap and freed memory
    kept (up to 1 GiB), the demo's LeNet step measured 5-26% faster (median 15%, five pairs of
    runs). Idempotent; returns whether glibc took the settings.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX):
        return False  # a trim threshold alone fixes the mmap threshold at 128 KiB: 2x slower
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def one_openmp_thread() -> None:
    """Run the calling thread's torch ops on one OpenMP thread, touching nothing process-wide.

    `torch.set_num_threads` also sets MKL's process-wide thread count, which would change
    the model's arithmetic in the main thread at timing-dependent moments (so results would
    depend on timing); and a second multi-threaded OpenMP team makes libgomp throttle the
    model's team. OpenMP's own per-thread setting, in the libgomp torch ships (Linux wheels),
    does neither; elsewhere this thread keeps the default.
    """
    gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if gomp.is_file():
        ctypes.CDLL(str(gomp)).omp_set_num_threads(1)


def spare_core() -> bool:
    """Whether this process may run on more cores than torch's threads keep busy.

    Only then can a background thread prepare batches alongside the training step; otherwise it
    takes its CPU time from the step's OpenMP team, which then waits for it at every barrier.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) > torch.get_num_threads()
