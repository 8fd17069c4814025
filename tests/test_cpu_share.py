"""The in-process CPU engine's threads follow the machine's load (``cpu_share.py``): every core
while the machine is free or only niced work runs, one core less for each core that other work
at normal priority keeps busy."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from vbs_resources.engine import cpu_share
from vbs_resources.engine.cpu_share import CoreShare, threads_for


@pytest.mark.parametrize(
    ("cores", "busy", "ceiling", "threads"),
    [
        (2, 0.0, None, 2),
        (2, 0.3, None, 2),  # a webserver's polling leaves the core to the engine
        (2, 0.5, None, 1),  # busy half the time: left to that work
        (2, 1.0, None, 1),
        (2, 2.0, None, 1),  # never below one thread
        (8, 2.6, None, 5),
        (8, 0.0, 4, 4),  # OMP_NUM_THREADS set lower by the user stays the ceiling
    ],
)
def test_threads_for_the_cores_left(cores, busy, ceiling, threads):
    assert threads_for(cores, busy, ceiling) == threads


def test_proc_stat_counts_normal_priority_and_kernel_time_not_niced_or_other_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 999 999 999 0 0 0 0 0 0\n"
        #     user nice system idle iowait irq softirq steal guest guest_nice
        "cpu0 100 500 20 300 7 1 2 3 0 0\n"
        "cpu1 10 0 5 900 0 0 0 0 0 0\n"
        "cpu2 5000 0 0 0 0 0 0 0 0 0\n"
        "intr 12345 0 0\n"
    )
    competing, total = cpu_share._cpu_ticks({0, 1}, str(stat))
    assert competing == (100 + 20 + 1 + 2 + 3) + (10 + 5)
    assert total == (100 + 500 + 20 + 300 + 7 + 1 + 2 + 3) + (10 + 5 + 900)


def test_own_ticks_reads_past_a_process_name_with_spaces_and_parentheses(tmp_path):
    stat = tmp_path / "stat"
    fields = ["S"] + ["0"] * 10 + ["41", "9"] + ["0"] * 30
    stat.write_text("1234 (vbs (run) x) " + " ".join(fields) + "\n")
    assert cpu_share._own_ticks(str(stat)) == 50


class Machine:
    """Scripted readings of (competing ticks, all ticks, own ticks) on 2 cores, 100 ticks a
    second per core."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reading = (0, 0, 0)

    def advance(self, seconds: float, busy_elsewhere: float, own: float) -> None:
        competing, total, mine = self.reading
        ticks = round(seconds * 100)
        self.reading = (
            competing + round((busy_elsewhere + own) * ticks),
            total + 2 * ticks,
            mine + round(own * ticks),
        )
        self.now += seconds


def test_threads_drop_under_competition_and_come_back_when_it_ends():
    machine, calls = Machine(), []
    share = CoreShare(calls.append, interval_s=1.0, cpus={0, 1}, clock=lambda: machine.now,
                      read=lambda: machine.reading)  # fmt: skip
    assert share.threads == 2
    machine.advance(0.5, busy_elsewhere=1.0, own=1.0)
    assert share.check() is None and calls == []  # not a second yet: nothing measured
    machine.advance(0.6, busy_elsewhere=1.0, own=1.0)
    assert share.check() == 1 and calls == [1]  # the engine's own busy time is not counted
    machine.advance(2.0, busy_elsewhere=1.0, own=1.0)
    assert share.check() is None and calls == [1]  # unchanged: nothing set again
    machine.advance(1.5, busy_elsewhere=0.1, own=1.0)
    assert share.check() == 2 and calls == [1, 2]


def test_the_ceiling_is_never_exceeded():
    machine, calls = Machine(), []
    share = CoreShare(calls.append, ceiling=1, interval_s=1.0, cpus={0, 1},
                      clock=lambda: machine.now, read=lambda: machine.reading)  # fmt: skip
    machine.advance(1.0, busy_elsewhere=0.0, own=1.0)
    assert share.threads == 1 and share.check() is None and calls == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_real_busy_process_at_normal_priority_takes_a_thread():
    """Measured from the real /proc: one busy loop, pinned to one of this process's cores."""
    cpus = sorted(os.sched_getaffinity(0))
    calls = []
    loop = subprocess.Popen(["taskset", "-c", str(cpus[0]), "sh", "-c", "while :; do :; done"])
    try:
        time.sleep(0.3)
        share = CoreShare(calls.append, interval_s=0.5, cpus=set(cpus[:2]))
        time.sleep(1.0)
        assert share.check() == 1
    finally:
        loop.kill()
        loop.wait()
    assert calls == [1]
