"""The host allocator setting for XLA:CPU (shardml.core.host_memory): what it asks glibc for, whom it
leaves alone, and that a process which emulates CPU devices reuses freed memory."""

import json
import os
import subprocess
import sys

import pytest

from shardml.core import host_memory


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


@pytest.fixture
def fresh(monkeypatch):
    """A process in which the setting has not been applied yet (restored afterwards)."""
    monkeypatch.setattr(host_memory, "_applied", [])
    return monkeypatch


def test_glibc_is_asked_for_one_arena_no_mmap_and_no_trimming_once(fresh):
    libc = FakeLibc()
    assert host_memory.keep_freed_host_memory(libc, environ={}) is True
    # mallopt(3): M_ARENA_MAX = -8, M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1 (-1 as the value: never trim)
    assert sorted(libc.calls) == [(-8, 1), (-4, 0), (-1, -1)], libc.calls
    assert host_memory.keep_freed_host_memory(libc, environ={}) is True and len(libc.calls) == 3, "set twice"


@pytest.mark.parametrize("environ", [{"SHARDML_HOST_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "4"},
                                     {"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"}])
def test_the_user_s_own_allocator_settings_are_left_alone(fresh, environ):
    libc = FakeLibc()
    assert host_memory.user_chose_allocator(environ).startswith(next(iter(environ))), environ
    assert host_memory.keep_freed_host_memory(libc, environ=environ) is False and libc.calls == []


def test_other_tunables_and_variables_do_not_count_as_a_choice():
    assert host_memory.user_chose_allocator({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "SHARDML_HOST_MALLOC": "kept",
                                             "PYTHONMALLOC": "malloc"}) == ""


def test_a_refused_setting_is_reported_as_not_kept(fresh):
    assert host_memory.keep_freed_host_memory(FakeLibc(answer=0), environ={}) is False


# A child process: shardml's own suite leaves the allocator as it is (tests/conftest.py). It emulates
# the CPU devices as a training script does, then fills, frees and refills a 96 MiB block in its
# main thread and in another one. glibc's default maps such a block afresh each time (above its
# largest mmap threshold, 32 MiB, and above a thread arena's largest heap, 64 MiB): 24,576 faults
# of 4 KiB pages per fill.
_CHILD = """
import ctypes, json, resource, sys, threading
import shardml
shardml.emulate_cpu_devices(8)
from shardml.core import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 96 << 20

def fill():  # malloc itself: numpy would ask for huge pages, which hide the faults
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def twice(out):
    out.append(fill())
    out.append(fill())

main, other = [], []
twice(main)
worker = threading.Thread(target=twice, args=(other,))
worker.start()
worker.join()
print(json.dumps({"applied": host_memory._applied, "main": main, "other": other}))
"""


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's allocator only")
def test_a_process_that_emulates_cpu_devices_refills_freed_memory_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in
           ("SHARDML_HOST_MALLOC", "GLIBC_TUNABLES", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert found["applied"] == [True], f"emulate_cpu_devices did not keep freed host memory: {found}"
    pages = (96 << 20) // 4096
    for where in ("main", "other"):
        assert found[where][1] < pages // 8, f"{found[where][1]} page faults to refill a freed 96 MiB block " \
                                             f"({where} thread; {pages} pages)"


class TrimmingLibc(FakeLibc):
    def __init__(self):
        super().__init__()
        self.trims = 0

    def malloc_trim(self, pad):
        self.trims += 1
        return 1


def test_kept_pages_go_back_only_past_the_bound():
    # The kept heap fragments on large steps (a 4x decoder grew 1 GB a step until killed): past
    # the bound its free pages are handed back, below it they stay.
    libc = TrimmingLibc()
    assert host_memory.trim_if_over(libc, 100, resident=lambda: 100) is False and libc.trims == 0
    assert host_memory.trim_if_over(libc, 100, resident=lambda: 101) is True and libc.trims == 1
    assert host_memory.resident_bytes() > 0


def test_the_setting_starts_its_watcher_at_half_the_host_memory(fresh):
    started = []
    fresh.setattr(host_memory.threading, "Thread", lambda **kw: started.append(kw) or type(
        "T", (), {"start": lambda self: None})())
    libc = TrimmingLibc()
    assert host_memory.keep_freed_host_memory(libc, environ={}) is True
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # written out: the test's own reference
    assert [kw["args"] for kw in started] == [(libc, int(host * host_memory.TRIM_AT_HOST_FRACTION))]
