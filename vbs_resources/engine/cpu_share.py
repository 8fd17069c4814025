"""The in-process CPU engine's OpenMP threads on a shared machine: every core, less the cores
that other work at normal priority keeps busy, re-decided while the engine runs.

An OpenMP region waits for its slowest thread. When another process at the same priority keeps
one of two cores busy, the engine's thread on that core runs in the scheduler's time slices and
every region waits for it: measured on a 2-core Xeon, 1048 tok/s idle fell to 60 tok/s beside
one busy loop, while one thread gave 649. A competitor at ``nice`` 19 costs almost nothing
(1028 tok/s with both threads). So the busy time that counts is the kernel's ``user`` and
``system`` time of the engine's cores (``/proc/stat``), which leaves out niced processes, less
this process's own (``/proc/self/stat``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# /proc/stat fields after the cpu name: user nice system idle iowait irq softirq steal ...
_COMPETING = (0, 2, 5, 6, 7)


def _cpu_ticks(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int]:
    """Ticks on ``cpus`` since boot: (spent at normal priority or in the kernel, all)."""
    competing = total = 0
    with open(stat) as fh:
        for line in fh:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            fields = [int(v) for v in rest.split()[:8]]
            competing += sum(fields[i] for i in _COMPETING if i < len(fields))
            total += sum(fields)
    return competing, total


def _own_ticks(stat: str = "/proc/self/stat") -> int:
    """This process's user and system ticks (all its threads)."""
    with open(stat) as fh:
        fields = fh.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def threads_for(cores: int, busy_elsewhere: float, ceiling: int | None = None) -> int:
    """The engine's threads when other work keeps ``busy_elsewhere`` of ``cores`` busy: a core
    busy half the time or more is left to that work; never more than ``ceiling``."""
    return max(1, min(ceiling or cores, cores - math.floor(busy_elsewhere + 0.5)))


class CoreShare:
    """Call ``check()`` between engine steps: about once per ``interval_s`` it measures the
    cores other work used since the last measure and sets the engine's threads to fit."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        ceiling: int | None = None,
        interval_s: float = 1.0,
        cpus: set[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read: Callable[[], tuple[int, int, int]] | None = None,
    ) -> None:
        self.cpus = set(cpus if cpus is not None else os.sched_getaffinity(0))
        self.ceiling = min(ceiling or len(self.cpus), len(self.cpus))
        self.threads = self.ceiling
        self._set_threads = set_threads
        self._interval_s = interval_s
        self._clock = clock
        # A niced vbs's own time is counted under "nice", not in the competing fields.
        own = _own_ticks if os.getpriority(os.PRIO_PROCESS, 0) <= 0 else (lambda: 0)
        self._read = read or (lambda: (*_cpu_ticks(self.cpus), own()))
        self._last = self._read()
        self._last_at = clock()

    def check(self) -> int | None:
        """The new thread count when it changed, else None."""
        now = self._clock()
        if now - self._last_at < self._interval_s:
            return None
        reading = self._read()
        competing, total, own = (
            now_ - then for now_, then in zip(reading, self._last, strict=True)
        )
        self._last, self._last_at = reading, now
        if total <= 0:
            return None
        busy_elsewhere = max(0.0, (competing - own) / (total / len(self.cpus)))
        threads = threads_for(len(self.cpus), busy_elsewhere, self.ceiling)
        if threads == self.threads:
            return None
        log.info(
            "vbs engine: %d of %d cores busy with other work at normal priority; %d thread(s)",
            round(busy_elsewhere),
            len(self.cpus),
            threads,
        )
        self._set_threads(threads)
        self.threads = threads
        return threads


_SHARED: CoreShare | None = None


def follow_load() -> Callable[[], object]:
    """The check the in-process CPU engine runs after each step: one per process (every engine
    of the process uses the same OpenMP threads), never above the threads the engine started
    with (``OMP_NUM_THREADS``, as torch read it)."""
    global _SHARED
    if _SHARED is None:
        import torch

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it binds threads;
        # torch._C keeps the real one.
        _SHARED = CoreShare(torch._C.set_num_threads, ceiling=torch.get_num_threads())
    return _SHARED.check


def follow_load_in_workers() -> bool:
    """In a vLLM server's CPU worker (called by vbs's plugin): the same check after each of
    its steps, the threads it started with as the ceiling. False where there is no CPU worker
    to follow (another platform)."""
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:
        return False
    original = CPUWorker.execute_model
    if getattr(original, "_vbs_follows_load", False):
        return True

    def execute_model(self: object, *args: object, **kwargs: object) -> object:
        output = original(self, *args, **kwargs)
        follow_load()()
        return output

    execute_model._vbs_follows_load = True  # type: ignore[attr-defined]
    CPUWorker.execute_model = execute_model  # type: ignore[method-assign]
    return True
