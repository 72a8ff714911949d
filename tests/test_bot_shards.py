"""Two ``hugginggpt bot`` processes, cluster 0 and 1 of 2 over 2 shards, against the fake Discord with four
servers and per-shard dispatch: each process serves only the servers on its shard; their IDENTIFYs are 5 s
apart (one bucket); one is killed mid-run and restarted, and reports the run it lost in its thread.

The identify gates themselves (the file lock, and PostgreSQL's advisory locks on a real server) are checked
on their own below.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from bot.app import INTERRUPTED_NOTICE
from bot.identify import FileIdentifyGate, IdentifyGate, PostgresIdentifyGate
from storage import Storage
from tests.fakes import discord_server, hf_server, llm_server
from tests.fakes.agent_fakes import agent_settings, hf_tasks
from tests.fakes.discord_server import BOT_ID, GUILD_ID, FakeDiscord
from tests.fakes.llm_server import Reply

SHARDS = 2
GUILDS = [GUILD_ID + (k << 22) for k in range(4)]  # shards 0, 1, 0, 1
NO_TASKS = json.dumps({"tasks": []})


class Cluster:
    def __init__(self, index: int, env: dict[str, str], log: Path) -> None:
        self.index = index
        self.env = env | {"DISCORD_CLUSTER_INDEX": str(index)}
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "bot"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None and self._log is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Any, list[Cluster], Any]]:
    def script(body: dict[str, Any]) -> str | Reply:
        asked = json.dumps(body["messages"])
        if body.get("stream"):
            return "Answered."
        return Reply(text=NO_TASKS, delay=120) if "slow request" in asked else NO_TASKS

    llm = llm_server.start_in_thread(script)
    hf = hf_server.start_in_thread(hf_tasks("text-to-speech"))
    server = discord_server.start_in_thread(guild_ids=GUILDS, shard_count=SHARDS, max_concurrency=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_"))}
    env |= agent_settings(llm.base_url, hf.base_url, tmp_path / "data")
    env |= {
        "DISCORD_TOKEN": "test-token",
        "DISCORD_API_BASE": server.api_base,
        "DISCORD_GATEWAY_URL": server.gateway_url,
        "DISCORD_USER_RUNS_PER_MINUTE": "0",
        "DISCORD_SHARD_COUNT": str(SHARDS),
        "DISCORD_CLUSTER_COUNT": "2",
    }
    clusters = [Cluster(i, env, tmp_path / f"cluster-{i}.log") for i in range(2)]
    try:
        yield server, clusters, llm
    finally:
        for cluster in clusters:
            if cluster.process is not None and cluster.process.poll() is None:
                cluster.process.kill()
                cluster.process.wait()
        server.stop()
        hf.stop()
        llm.stop()


def _answers(fake: FakeDiscord, thread_id: int) -> list[str]:
    return [
        r.json["content"]
        for r in fake.requests_to("POST", rf"/channels/{thread_id}/messages$", status=200)
        if (r.json or {}).get("content") in ("Answered.", INTERRUPTED_NOTICE)
    ]


def test_two_clusters_serve_their_own_servers_and_space_their_logins(
    tmp_path: Path, world: tuple[Any, list[Cluster], Any]
) -> None:
    server, clusters, llm = world
    fake: FakeDiscord = server.fake
    for cluster in clusters:
        cluster.start()
    server.wait_for(lambda f: len(f.identifies) == 2 and len(f.requests_to("GET", "/gateway/bot$")) >= 2, timeout=60)
    (first_at, first_shard), (second_at, second_shard) = fake.identifies
    assert {first_shard, second_shard} == {0, 1}, "each cluster identified its own shard"
    assert second_at - first_at >= 5.0, "one bucket (max_concurrency 1): the second login waited 5 s"

    # A mention in each of the four servers: each is answered once, by the cluster that owns its shard.
    mentions = [server.call(fake.user_message, f"<@{BOT_ID}> hello {g}", channel_id=fake.channel_of(g)) for g in GUILDS]
    for mention in mentions:
        server.wait_for(lambda f, m=mention: _answers(f, int(m["id"])) == ["Answered."], timeout=60)
    for cluster in clusters:
        server.wait_for(lambda f, c=cluster: "in 2 guilds" in c.output(), timeout=10)

    # Cluster 1 is killed (SIGKILL) while it plans a request in its server, then started again.
    slow = server.call(fake.user_message, f"<@{BOT_ID}> slow request", channel_id=fake.channel_of(GUILDS[1]))
    server.wait_for(lambda f: any("slow request" in json.dumps(r) for r in llm.requests), timeout=30)
    assert clusters[1].stop(signal.SIGKILL) == -signal.SIGKILL
    clusters[1].start()
    server.wait_for(lambda f: _answers(f, int(slow["id"])) == [INTERRUPTED_NOTICE], timeout=60)
    assert len(fake.identifies) == 3 and fake.identifies[2][1] == 1, "the restarted cluster took shard 1 again"
    assert all(_answers(fake, int(m["id"])) == ["Answered."] for m in mentions), "no other thread was told"
    for cluster in clusters:
        assert cluster.stop() == 0
        assert "Traceback" not in cluster.output()

    async def runs() -> dict[str, list[str]]:
        async with await Storage.open(tmp_path / "data") as storage:
            found = {}
            for message in [*mentions, slow]:
                conversation = await storage.find_conversation("discord", message["id"])
                assert conversation is not None
                found[message["id"]] = [r.status for r in await storage.runs(conversation.id)]
            return found

    statuses = asyncio.run(runs())
    assert statuses == {**{m["id"]: ["ok"] for m in mentions}, slow["id"]: ["interrupted"]}, "nothing committed lost"


async def _spacing(gates: list[IdentifyGate], bucket: int) -> list[float]:
    """The moments each gate's turn came, all asking for ``bucket`` at once."""
    turns: list[float] = []

    async def take(gate: IdentifyGate) -> None:
        await gate.wait_turn(bucket)
        turns.append(time.monotonic())

    await asyncio.gather(*(take(g) for g in gates))
    return sorted(turns)


async def test_file_gates_space_one_bucket_and_leave_others_free(tmp_path: Path) -> None:
    gates: list[IdentifyGate] = [FileIdentifyGate(tmp_path, spacing=0.5) for _ in range(3)]
    try:
        turns = await _spacing(gates, 0)
        assert all(b - a >= 0.5 for a, b in itertools.pairwise(turns))
        started = time.monotonic()
        await gates[0].wait_turn(1)  # another bucket: no wait behind bucket 0
        assert time.monotonic() - started < 0.5
    finally:
        for gate in gates:
            await gate.aclose()


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL server on a Unix socket (as root, run by the ``postgres`` user: initdb refuses
    root)."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    root = Path(tempfile.mkdtemp(prefix="hgpt-identify-pg-"))
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        root.chmod(0o755)
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    subprocess.run([*run_as, "initdb", "-D", str(data), "-A", "trust", "--no-sync", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    options = f"-k {root} -c listen_addresses=''"
    subprocess.run([*run_as, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"host={root} user=postgres dbname=postgres"
    finally:
        subprocess.run([*run_as, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_gates_space_one_bucket_across_sessions(postgres: str) -> None:
    gates: list[IdentifyGate] = [PostgresIdentifyGate(postgres, spacing=0.5) for _ in range(3)]
    try:
        turns = await _spacing(gates, 0)
        assert all(b - a >= 0.5 for a, b in itertools.pairwise(turns))
    finally:
        for gate in gates:
            await gate.aclose()
