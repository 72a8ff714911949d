"""A full disk under SQLite, for real: a small tmpfs mounted in a user and mount namespace of the test's own
(``unshare``), so nothing outside the test sees it. SQLite in WAL mode reports a full disk as SQLITE_FULL
while appending to its log but as a plain "disk I/O error" when its shared-memory index cannot grow (a
restart on a full disk): both must reach the user as "the disk is full" (issue 11, item 9), and the storage
must work again, with everything committed, once space is freed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "fakes" / "full_disk.py"
FULL = "the disk is full"


def in_namespace_with_tmpfs(mountpoint: Path, size: str, *command: str) -> list[str]:
    """``command`` in new user and mount namespaces where ``mountpoint`` is a fresh tmpfs of ``size``."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mountpoint), *command]


def tmpfs_unavailable(tmp_path: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here, or None if it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        in_namespace_with_tmpfs(probe, "64k", "true"), capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode:
        return f"cannot mount a tmpfs in a user namespace here (user namespaces disabled?): {done.stderr.strip()}"
    return None


def test_a_full_disk_is_reported_as_full_and_the_storage_recovers(tmp_path: Path) -> None:
    reason = tmpfs_unavailable(tmp_path)
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    command = in_namespace_with_tmpfs(disk, "3m", sys.executable, str(HELPER), str(disk / "data"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said["message"].startswith(FULL), said  # SQLite said "database or disk is full"
    assert said["file"].startswith(FULL), said  # its blob row, or the file itself
    assert said["restart"].startswith(FULL), said  # SQLite said "disk I/O error"
    assert "disk I/O error" in done.stderr  # the log keeps SQLite's own words
    assert said["kept"] == ["before the disk filled up", "after"]
