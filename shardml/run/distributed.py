"""Many processes: starting JAX's multi-controller runtime, who writes, and agreeing to stop.

shardml runs on ``jax.distributed`` as it is: every process runs the same program on its own
devices; JAX's coordination service connects them, and XLA's collectives (gloo between CPU
processes) move the data. A run started by ``shardml train`` or :func:`shardml.train` starts it
itself, before JAX's backend:

- explicitly: ``--coordinator HOST:PORT --num-processes N --process-id I`` (``start(...)``);
- auto-detected where ``jax.distributed.initialize()`` detects a cluster (Cloud TPU pods, SLURM,
  Open MPI, Kubernetes); with no cluster it stays one plain process.

Process 0 prints and writes the metrics, ``run.json`` and ``config.yaml``; every process writes
its own shards of each checkpoint (Orbax). A SIGTERM to any process stops all of them at the same
step (:class:`AgreedStop`, on JAX's preemption sync service). If a process dies, the others stop
within ``heartbeat_timeout`` seconds: the coordination service misses its heartbeats and
terminates them ("Terminating process because the JAX distributed service detected fatal
errors ... another task died"); if process 0 (the coordinator) dies, they stop at once; a process
that exits with an error makes the others stop within the same bound (shutdown barrier).

    start("10.0.0.1:8476", num_processes=2, process_id=0, heartbeat_timeout=60)  # before any JAX operation
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import NoReturn, Self

from shardml.core.devices import backend_started, cpu_only
from shardml.core.errors import ConfigError
from shardml.run.preemption import StopRequest

HEARTBEAT_TIMEOUT = 60  # seconds: how long the others run on after a process dies (also the shutdown wait)
INIT_TIMEOUT = 300  # seconds the processes wait for each other at the start
_NO_CLUSTER = "coordinator_address should be defined"


def _check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator HOST:PORT, --num-processes N and --process-id I go together (or give none "
                          "of them: a cluster JAX detects is used, else one process)")
    if coordinator is None:
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator {coordinator!r} must be HOST:PORT (process 0's address, e.g. 10.0.0.1:8476)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} must lie in [0, {num_processes}) (--num-processes "
                          f"{num_processes}); give each process its own id, 0 on the coordinator's host")


def start(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
          heartbeat_timeout: int = HEARTBEAT_TIMEOUT, init_timeout: int = INIT_TIMEOUT) -> bool:
    """Starts ``jax.distributed`` (once; before JAX's backend starts). Returns whether this is a
    multi-controller run (False: one plain process).

    Args:
      coordinator, num_processes, process_id: all three, or none (auto-detection). A lone
        ``num_processes=1`` means one plain process, without auto-detection.
      heartbeat_timeout: seconds after which a silent (dead) process makes the others stop; also
        how long a finishing process waits for the others at shutdown.
      init_timeout: seconds the processes wait for each other at the start.

    Raises:
      ConfigError: incomplete or impossible settings, or JAX's backend already started.
    """
    import jax

    if num_processes == 1 and coordinator is None and process_id in (None, 0):
        return jax.distributed.is_initialized()
    _check(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    if backend_started():
        if coordinator is not None:
            raise ConfigError("jax.distributed must start before JAX's backend: call shardml.start_distributed(...) "
                              "first thing, before any JAX operation")
        return False  # auto-detection only where it can still act (a notebook that already ran JAX: one process)
    timeouts = {"initialization_timeout": init_timeout, "heartbeat_timeout_seconds": heartbeat_timeout,
                "shutdown_timeout_seconds": heartbeat_timeout}
    if coordinator is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    else:
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as err:
            if _NO_CLUSTER in str(err):
                return False  # no cluster detected: one plain process
            raise
    if cpu_only():
        # CPU processes run their collectives over gloo (TCP); read when the backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def primary() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (no-op for one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def describe() -> str:
    """``process 1 of 2 (4 local devices of 8)``."""
    import jax

    return f"process {jax.process_index()} of {jax.process_count()} ({jax.local_device_count()} local devices of " \
           f"{jax.device_count()})"


class AgreedStop:
    """Stops every process at the same step when any of them is asked to stop.

    JAX's preemption sync service (started by ``jax.distributed``) catches SIGTERM, tells the
    coordinator, and all processes agree on the next step every one of them can reach;
    :meth:`requested` is True at that step on all of them (a local check each step, no collective).
    SIGINT (Ctrl-C) is forwarded to it as a SIGTERM. Use :class:`shardml.run.preemption.StopRequest`
    for one process instead.
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous = None

    def _interrupt(self, signum, frame):
        self.signal = self.signal or "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def requested(self, step: int) -> bool:
        """True on every process at the agreed step after any process got SIGTERM / SIGINT."""
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.signal = self.signal or "SIGTERM"
            return True
        return False


class LocalStop:
    """One process: :class:`~shardml.run.preemption.StopRequest` with the interface of :class:`AgreedStop`."""

    def __init__(self):
        self._request = StopRequest()

    @property
    def signal(self) -> str | None:
        return self._request.signal

    def __enter__(self) -> Self:
        self._request.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._request.__exit__(*exc)

    def requested(self, step: int) -> bool:
        return bool(self._request.signal)


def stop_request() -> AgreedStop | LocalStop:
    """The stop request of this run: agreed across processes, or this process's own."""
    return AgreedStop() if process_count() > 1 else LocalStop()


def say(*args, **kwargs) -> None:
    """``print`` on process 0 only."""
    if primary():
        print(*args, **kwargs)


def error(message: str) -> None:
    """An error line on stderr, from every process (each names itself when there are several)."""
    prefix = f"shardml[{process_index()}/{process_count()}]" if _multi() else "shardml"
    print(f"{prefix}: error: {message}", file=sys.stderr, flush=True)


def _multi() -> bool:
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def abandon(err: BaseException) -> NoReturn:
    """Ends this process of a multi-process run at once after an error (exit status 1).

    A failed collective (another process died: "Gloo ... Connection closed by peer") or any other
    error would otherwise leave this process waiting at JAX's shutdown barrier for processes that
    never come; the others learn of its end from the coordination service.
    """
    traceback.print_exception(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    error(f"{type(err).__name__}: {first} -- stopping this process now (exit 1). If another process died, its log "
          "says why; the remaining processes stop within the heartbeat timeout")
    sys.stdout.flush()
    os._exit(1)
