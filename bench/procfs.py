"""What processes hold and spend, read from /proc (Linux): memory and CPU of this process, its children and a
worker's child. Top-level functions, so a ``ProcessWorker`` can run ``peak_rss_mb`` in its child."""

from __future__ import annotations

import os

__all__ = ["alive", "cpu_seconds", "descendants", "peak_rss_mb", "rss_mb"]


def rss_mb(pid: int | str = "self") -> float:
    """Resident set of a process, MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0.0


def peak_rss_mb() -> float:
    """The most memory this process has held (VmHWM), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def descendants(pid: int | str = "self") -> list[int]:
    """Every process started by ``pid``, and by those, now."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
