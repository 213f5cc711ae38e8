"""Memory policy of a process that evaluates candidate after candidate."""

from __future__ import annotations

import ctypes
import os


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    A fitness process allocates the same large tensors (activations, scores) for every candidate.
    By default glibc maps blocks above a dynamic threshold afresh and trims the heap after frees,
    so every forward pass faults its working set in again: tens of thousands of page faults per
    candidate, measured here as about 5% of the forward pass. Kept, the memory is reused; the
    resident size stays at its high-water mark, which it reaches anyway.

    Threads started afterwards share the main arena: glibc otherwise gives each thread an arena
    of its own, and memory kept in the arena of a thread that scores layers cannot be reused by
    the forward pass (SmolLM2-135M, four candidates: 37 MB above the one-thread peak with one
    arena, 75 MB with one per thread). Our allocations are few and large, and the masks were no
    slower with the shared arena.

    Returns False (and does nothing) where the C library is not glibc, or when
    ``PRUNERZERO_KEEP_FREED_MEMORY=0`` asks for glibc's default (to compare, or on a host short
    of memory)."""
    if os.environ.get("PRUNERZERO_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from malloc.h
    return (bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))
            and bool(mallopt(m_arena_max, 1)))
