"""The host allocator on XLA:CPU: freed memory is kept for the next step, not handed back to the kernel.

XLA:CPU mallocs each program's temporary buffer (a train step's activations and gathered
weights: 58 MB per emulated device for the race decoder of ``benchmarks/bench_maxtext.py`` at
fsdp=8) at every execution and frees it at the end. glibc serves such a block with a fresh
``mmap`` (its mmap threshold cannot exceed 32 MiB) or from a thread arena's heap, which it unmaps
once the heap is empty; either way the next step writes into pages the kernel must fault in and
zero again. For that step it was 120,000 page faults per step and a quarter of the process's CPU
time in the kernel (``perf``), against 7 % for MaxText's step, whose smaller temporary buffer
(18 MB, layers scanned and recomputed) stays in the heap. :func:`keep_freed_host_memory` makes
glibc keep it: one arena (the main one, grown by ``brk``: a thread arena's heap holds at most
64 MiB, and glibc maps a larger block afresh whatever ``M_MMAP_MAX`` says; fsdp=2 x tensor=4 needs
94 MB), no ``mmap`` for large blocks, and no trimming. The costs: the single heap fragments, and
on larger steps it does not reuse what it keeps: the 4x decoder of ``bench_maxtext.py`` on fsdp=2 x
tensor=4 grew by about 1 GB a step to 23.5 GB and was killed for memory at step 7, where glibc's
default peaks at 9.3 GB. So a watcher thread hands the free pages back (``malloc_trim``) whenever
the process's resident memory passes half the host's (:data:`TRIM_AT_HOST_FRACTION`); below that,
freed memory stays. And XLA's compiler threads share one allocator lock, which made compiling
about 20 % slower in a compile-bound measurement. So a test suite, which compiles far more than it runs, is better off without it:
shardml's own suite and its pytest plugin leave the allocator as it is.

It is applied where shardml sets up emulated CPU devices (:func:`shardml.emulate_cpu_devices`,
the command line on a CPU-only machine), never on accelerators, and not where the user chose
allocator settings of their own (any ``MALLOC_*`` variable, ``glibc.malloc`` tunables) or set
``SHARDML_HOST_MALLOC=system``. Figures: ``benchmarks/bench_host_memory.py``.

    keep_freed_host_memory()   # True where glibc now keeps freed memory
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

OPT_OUT_ENV = "SHARDML_HOST_MALLOC"
OPT_OUT_VALUE = "system"
# mallopt(3) parameters (malloc.h) and the values set: the main arena only, no mmap-served blocks,
# and trimming off (-1: the man page's "disables trimming completely").
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# The watcher's bound: past this share of the host's memory, kept pages go back to the kernel.
TRIM_AT_HOST_FRACTION = 0.5
TRIM_CHECK_SECONDS = 0.5
# What says the user has tuned glibc's allocator already: then it is theirs to keep.
USER_MALLOC_ENV_PREFIX = "MALLOC_"
USER_TUNABLES = ("GLIBC_TUNABLES", "glibc.malloc")

_applied: list[bool] = []  # the outcome of the first call; mallopt is process-wide and set once


def user_chose_allocator(environ=None) -> str:
    """The environment setting that leaves the allocator as it is, or "" (none)."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT_ENV, "").lower() == OPT_OUT_VALUE:
        return f"{OPT_OUT_ENV}={OPT_OUT_VALUE}"
    own = sorted(k for k in environ if k.startswith(USER_MALLOC_ENV_PREFIX))
    if own:
        return own[0]
    name, marker = USER_TUNABLES
    return name if marker in environ.get(name, "") else ""


def glibc():
    """The C library as a ``ctypes.CDLL`` where it is glibc (``mallopt`` exists), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):  # not glibc: musl, macOS, Windows
        return None


def keep_freed_host_memory(libc=None, environ=None) -> bool:
    """Sets glibc's allocator to keep freed memory (see the module docstring), bounded by a watcher
    thread that hands free pages back past half the host's memory; True when it did. Does nothing
    off glibc or where :func:`user_chose_allocator` names a setting; once per process.
    :func:`shardml.emulate_cpu_devices` calls it; call it yourself, before JAX starts (threads that
    already have an arena keep it), where you set XLA:CPU's devices another way.

        shardml.keep_freed_host_memory()   # False on macOS, or with SHARDML_HOST_MALLOC=system
    """
    if _applied:
        return _applied[0]
    libc = glibc() if libc is None else libc
    ok = libc is not None and not user_chose_allocator(environ)
    if ok:
        ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    if ok and hasattr(libc, "malloc_trim"):
        limit = int(TRIM_AT_HOST_FRACTION * host_memory_bytes())
        threading.Thread(target=_watch, args=(libc, limit), name="shardml-host-trim", daemon=True).start()
    _applied.append(ok)
    return ok


def host_memory_bytes() -> int:
    """The host's physical memory in bytes (``sysconf``)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``), or 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_if_over(libc, limit_bytes: int, resident=resident_bytes) -> bool:
    """Hands glibc's free pages back to the kernel when ``resident()`` exceeds ``limit_bytes``;
    True when it did. The kept heap's bound (see the module docstring).

        trim_if_over(glibc(), 8 << 30)   # False while the process holds under 8 GiB
    """
    if resident() <= limit_bytes:
        return False
    libc.malloc_trim(0)
    return True


def _watch(libc, limit_bytes: int) -> None:
    while True:
        time.sleep(TRIM_CHECK_SECONDS)
        trim_if_over(libc, limit_bytes)
