"""Which processes are alive, across hosts: one ``processes`` row per open ``Storage``, kept fresh by a
heartbeat, tags the runs it starts. A reaper in every process marks the runs of dead owners ``interrupted``.

An owner is dead when its row is gone (it closed, or a reaper removed it); when it ran on this machine and
its pid no longer runs with the same start time (a kill -9 is seen at once, and a reused pid is not taken for
the dead process); when it is this very process and that ``Storage`` is closed (several can be open in one
process); and, for another machine, when its heartbeat is older than the timeout on the database's clock (a
host that died, or lost the database for that long). "This machine" means the same host name, boot and pid
namespace, the only case where a pid read here means the same process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OPEN_HERE", "Identity", "owner_alive"]

OPEN_HERE: set[str] = set()
"""Ids of the ``Storage`` objects open in this process: process-wide state, as the kernel's locks were."""


@dataclass(frozen=True)
class Identity:
    host: str
    machine: str | None
    pid: int
    started: str | None

    @classmethod
    def current(cls) -> Identity:
        host = socket.gethostname()
        return cls(host, _machine(host), os.getpid(), process_started(os.getpid()))


def owner_alive(owner: Any, me: Identity, now: float, timeout: float) -> bool:
    """Whether the process of ``owner`` (a ``processes`` row, or None when there is none) still runs."""
    if owner is None:
        return False
    if me.machine is not None and owner.machine == me.machine:
        if owner.pid == me.pid and owner.started == me.started:
            return owner.id in OPEN_HERE
        return owner.started is not None and process_started(owner.pid) == owner.started
    return now - owner.heartbeat_at < timeout


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _machine(host: str) -> str | None:
    """Host name, boot id and pid namespace: equal only where the same pid is the same process."""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        return f"{host}/{boot}/{namespace}"
    return None
