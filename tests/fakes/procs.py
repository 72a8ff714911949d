"""What a process is doing, read from /proc: to show that work a timeout stopped really stopped."""

from __future__ import annotations

import os
import threading

__all__ = ["children", "cpu_seconds", "rss_mb", "working_threads"]


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds of a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    if fields[0] == "Z":  # a zombie uses no CPU
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def working_threads() -> list[int]:
    """Threads of this process that are running or waiting for a core (state R), other than the caller.

    Unlike CPU time, this does not depend on how busy the machine is: a thread with work is R even while
    other processes hold the cores.
    """
    me = threading.get_native_id()
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state == "R" and int(tid) != me:
            found.append(int(tid))
    return found


def children() -> list[int]:
    """The processes this process started that are still there."""
    found: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                found += [int(pid) for pid in f.read().split()]
        except FileNotFoundError:
            continue
    return found


def rss_mb() -> float:
    """This process's resident set, MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
