"""The host allocator setting for XLA:CPU (shardml.core.host_memory): what it asks glibc for, whom it
leaves alone, and that this test process (set up by conftest's emulate_cpu_devices) reuses freed memory."""

import ctypes
import resource

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


@pytest.mark.skipif(host_memory.glibc() is None or bool(host_memory.user_chose_allocator()),
                    reason="glibc's allocator only, and not where the user set their own")
def test_this_process_refills_freed_memory_without_page_faults():
    # conftest emulates the CPU devices, which applies the setting on a CPU-only machine
    assert host_memory._applied == [True], "emulate_cpu_devices did not keep freed host memory"
    size = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mmapped and unmapped by default

    libc = host_memory.glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def faults_to_fill() -> int:  # malloc itself: numpy would ask for huge pages, which hide the faults
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_to_fill()
    refill = faults_to_fill()
    # glibc's default maps 64 MiB afresh each time: 16,384 faults of 4 KiB pages
    assert refill < size // 4096 // 8, f"{refill} page faults to refill a freed 64 MiB block"
