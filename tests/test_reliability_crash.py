"""kill -9 in the middle of runs, then a restart: nothing committed is lost, interrupted runs are reported.

First through the real command (a run killed while one model is still working, then ``chat`` restarted on
the same conversation), then with 30 conversations busy at once in a driver killed at a random moment; on
SQLite and on PostgreSQL. Storage-level crash safety (a writer killed mid-step) is in test_storage_crash.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.catalog import Catalog
from storage import Storage, StorageConfig
from tests.fakes.agent_fakes import hf_tasks
from tests.fakes.hf_server import Fault, png_bytes
from tests.fakes.hf_server import start_in_thread as start_hf
from tests.fakes.llm_server import start_in_thread as start_llm
from tests.fakes.reliability import database_is_sound, db_rows, plan_json, stage

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "fakes" / "crash_driver.py"
CAPTIONER = Catalog.bundled().by_task("image-to-text")[0].id

DRAW = plan_json({"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a cat"}})
DRAW_AND_DESCRIBE = plan_json(
    {"id": 0, "task": "text-to-image", "dep": [], "args": {"text": "a dog"}},
    {"id": 1, "task": "image-to-text", "dep": [], "args": {"image": "img-1.png"}},
)


def script(body: dict[str, Any]) -> str:
    request = body["messages"][-1]["content"].rsplit("Request:", 1)[-1]
    if stage(body) == "plan":
        return DRAW_AND_DESCRIBE if "and describe" in request else DRAW
    return "Here it is."


def files_are_whole(config: StorageConfig) -> None:
    """Every resource row has its file, with the content its digest says."""
    for (sha,) in db_rows(config, "SELECT DISTINCT sha256 FROM resources"):
        path = config.data_dir / "files" / sha[:2] / sha
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_a_killed_command_loses_nothing_committed_and_the_restart_reports_it(
    storage_config: StorageConfig, tmp_path: Path
) -> None:
    llm = start_llm(script)
    hf = start_hf(hf_tasks("text-to-image", "image-to-text"))
    data_dir = storage_config.data_dir
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENAI_BASE_URL": llm.base_url,
        "OPENAI_API_KEY": "sk-test",
        "HF_TOKEN": "hf_test",
        "HF_INFERENCE_BASE_URL": hf.base_url,
        "HUGGINGGPT_DATA_DIR": str(data_dir),
        "HUGGINGGPT_MODEL_SELECTION": "downloads",
        "HUGGINGGPT_DEMOS": "fixed",
        "DATABASE_URL": storage_config.database_url or "",
    }

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=env,
            cwd=tmp_path,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes())
    try:
        first = cli("ask", "draw a cat", "--attach", str(photo), "--conversation", "c1", "--json")
        assert first.returncode == 0, first.stderr
        done = json.loads(first.stdout)
        # The second run: the drawing finishes, the captioner takes a minute; kill -9 in between.
        hf.server.script(CAPTIONER, Fault.slow(60))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "ask",
                "draw a dog and describe my photo",
                "--conversation",
                "c1",
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (
            any(r.model == CAPTIONER for r in hf.server.requests)
            and db_rows(storage_config, "SELECT count(*) FROM tasks WHERE status = 'ok'") == [(2,)]
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not get mid-way"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # Restart on the same conversation: the user is told, then carries on.
        chat = cli("chat", "--conversation", "c1", stdin="draw a cat again\n/quit\n")
    finally:
        llm.stop()
        hf.stop()
    assert chat.returncode == 0, chat.stderr
    (killed,) = [r for (r,) in db_rows(storage_config, "SELECT id FROM runs WHERE status = 'interrupted'")]
    assert f"note: run {killed} was interrupted before it finished" in chat.stderr
    # Nothing committed was lost: the first run whole, the killed run's request, plan and finished task.
    assert db_rows(storage_config, "SELECT status, answer FROM runs WHERE id = ?", (done["run_id"],)) == [
        ("ok", done["answer"])
    ]
    messages = db_rows(storage_config, "SELECT role, text FROM messages ORDER BY seq")
    assert messages == [
        ("user", "draw a cat"),
        ("assistant", "Here it is."),
        ("user", "draw a dog and describe my photo"),
        ("user", "draw a cat again"),
        ("assistant", "Here it is."),
    ]
    assert db_rows(storage_config, "SELECT task_id, status FROM tasks WHERE run_id = ?", (killed,)) == [
        (0, "ok")
    ]
    names = [n for (n,) in db_rows(storage_config, "SELECT name FROM resources ORDER BY seq")]
    assert names == ["img-1.png", "out-1-0.png", "out-2-0.png", "out-3-0.png"]  # the killed run's output kept
    files_are_whole(storage_config)
    database_is_sound(storage_config)
    unreported = "SELECT count(*) FROM runs WHERE status = 'interrupted' AND reported = 0"
    assert db_rows(storage_config, unreported) == [(0,)]


async def test_kill_9_among_thirty_busy_conversations(storage_config: StorageConfig) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    where = [
        str(storage_config.data_dir),
        *([storage_config.database_url] if storage_config.database_url else []),
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DRIVER), *where, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    finished: dict[str, str] = {}
    while len(finished) < 40:  # let forty runs end, with the other conversations mid-run, then kill
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode().split()
        assert line, "the driver stopped"
        finished[line[1]] = line[2]
    proc.send_signal(signal.SIGKILL)
    for line in (await proc.stdout.read()).decode().splitlines():  # all it had said before it died
        _, run_id, status = line.split()
        finished[run_id] = status
    assert await proc.wait() == -signal.SIGKILL

    async with await Storage.open(storage_config) as store:  # the restart
        interrupted = {r.id for r in await store.unreported_interrupted_runs()}
    runs = dict(db_rows(storage_config, "SELECT id, status FROM runs"))
    # Every run whose end was committed reads as it ended; every other one was cut short and reads
    # interrupted, to be reported (or, if the kill fell between its last commit and the driver's print, ended).
    assert {r: runs[r] for r in finished} == finished
    assert "running" not in runs.values()
    assert {r for r, s in runs.items() if s == "interrupted"} == interrupted
    assert interrupted and interrupted.isdisjoint(finished)  # the kill did land mid-run
    answered = {r for (r,) in db_rows(storage_config, "SELECT run_id FROM messages WHERE role = 'assistant'")}
    assert set(finished) <= answered  # every committed answer is there
    files_are_whole(storage_config)
    database_is_sound(storage_config)
    print(
        f"\ncrash ({storage_config.engine}): kill -9 with {len(runs)} runs recorded: {len(finished)} ended before it, all kept as they "
        f"ended; {len(interrupted)} cut short, all marked interrupted to be reported"
    )
