"""Storage at scale: whole runs per second and their p99 latency with 200 conversations at once, one process on
SQLite against two processes sharing one PostgreSQL.

Every run is a full ``Conversations.ask`` (plan of two tasks, model selection, two model calls, a streamed
answer, every step recorded) against the loopback LLM and Hugging Face fakes with no added latency, so the
figures are our own overhead: the agent, the storage and the database. Each process serves its share of the
conversations, each conversation asks ``turns`` times in a row; the processes start together (a barrier on
stdin) and the wall time runs from the barrier to the last run's end. PostgreSQL is a throwaway cluster of
Debian's server, as the tests start it (or ``--database-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.events import Done

from .common import REPO_ROOT, Result, parse_args, percentile
from .controller import ScriptedController
from .harness import loopback, runtime_on
from .overhead import PLAN, TEXT

__all__ = ["main", "run"]

NAME = "storage_scale"


async def _worker(data_dir: Path, database_url: str | None, conversations: int, turns: int, tag: str) -> None:
    """One process's share: set up, say READY, wait for GO, run, print the latencies as one JSON line."""
    with loopback(ScriptedController({TEXT: PLAN}), data_dir, database_url=database_url or "") as world:
        async with runtime_on(world) as runtime:
            service = runtime.conversations
            ids = [(await service.open("bench", external_id=f"{tag}-{n}")).id for n in range(conversations)]
            print("READY", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            latencies: list[float] = []
            failed = 0

            async def converse(conversation_id: str) -> None:
                nonlocal failed
                for _ in range(turns):
                    start = time.perf_counter()
                    ended_ok = False
                    async for event in service.ask(conversation_id, TEXT):
                        ended_ok = isinstance(event, Done) and event.result.status == "ok"
                    latencies.append(time.perf_counter() - start)
                    failed += not ended_ok

            await asyncio.gather(*(converse(i) for i in ids))
            print(json.dumps({"latencies": latencies, "failed": failed, "end": time.time()}), flush=True)


async def _measure(
    label: str, processes: int, database_url: str | None, conversations: int, turns: int
) -> dict[str, Any]:
    """Start ``processes`` workers sharing ``conversations``, release them together, gather their figures."""
    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        for p in range(processes):
            command = [
                sys.executable,
                "-m",
                "bench.storage_scale",
                "--worker",
                "--data-dir",
                str(Path(tmp) / "data"),
                "--conversations",
                str(conversations // processes),
                "--turns",
                str(turns),
                "--tag",
                str(p),
            ]
            if database_url:
                command += ["--database-url", database_url]
            workers.append(
                await asyncio.create_subprocess_exec(
                    *command, cwd=REPO_ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
            )
        for worker in workers:
            assert worker.stdout is not None
            line = await worker.stdout.readline()
            if line.strip() != b"READY":
                raise RuntimeError(f"a {label} worker did not start: {line!r}")
        start = time.time()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"GO\n")
            await worker.stdin.drain()
        reports = []
        for worker in workers:
            assert worker.stdout is not None
            reports.append(json.loads(await worker.stdout.readline()))
            if await worker.wait():
                raise RuntimeError(f"a {label} worker failed")
    latencies = [x for r in reports for x in r["latencies"]]
    wall = max(r["end"] for r in reports) - start
    return {
        "setup": label,
        "processes": processes,
        "conversations": conversations,
        "runs": len(latencies),
        "failed": sum(r["failed"] for r in reports),
        "seconds": round(wall, 2),
        "runs_per_second": round(len(latencies) / wall, 1),
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
    }


async def run(smoke: bool, database_url: str | None = None) -> Result:
    conversations, turns = (10, 1) if smoke else (200, 2)
    cluster = None
    if database_url is None:
        from tests.fakes.postgres import PostgresCluster

        cluster = await asyncio.to_thread(
            PostgresCluster.start
        )  # it runs the migrations on a loop of its own
        database_url = cluster.new_database()
    try:
        rows = [
            await _measure("SQLite, 1 process", 1, None, conversations, turns),
            await _measure("PostgreSQL, 2 processes", 2, database_url, conversations, turns),
        ]
    finally:
        if cluster is not None:
            cluster.stop()
    sqlite, postgres = rows
    return Result(
        name=NAME,
        title="Storage at scale: runs/s and p99 latency, SQLite vs PostgreSQL",
        smoke=smoke,
        headers=[
            "setup",
            "conversations",
            "runs",
            "failed",
            "runs/s",
            "run latency p50 (s)",
            "run latency p99 (s)",
        ],
        rows=[
            [
                r["setup"],
                r["conversations"],
                r["runs"],
                r["failed"],
                r["runs_per_second"],
                r["p50_s"],
                r["p99_s"],
            ]
            for r in rows
        ],
        summary=(
            f"{conversations} conversations at once: SQLite in one process {sqlite['runs_per_second']} runs/s "
            f"(p99 {sqlite['p99_s']:.2f} s); PostgreSQL shared by two processes {postgres['runs_per_second']} "
            f"runs/s (p99 {postgres['p99_s']:.2f} s)"
        ),
        data={"setups": rows, "turns": turns},
        notes=[
            "Each run: plan (2 tasks: text-to-image, then image-to-text of its output), one selection call, two "
            "model calls, streamed answer, every event recorded; LLM and HF fakes with no added latency, one pair "
            "per process (their CPU is in the figures too).",
            f"Each conversation asks {turns} time(s) in a row; all conversations start together. PostgreSQL: a "
            "local cluster on a Unix socket (fsync off, as in the tests); a real server adds its network round "
            "trips and durable commits.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--database-url", help="an existing PostgreSQL database (default: a throwaway cluster)"
        )
        parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
        parser.add_argument("--conversations", type=int, help=argparse.SUPPRESS)
        parser.add_argument("--turns", type=int, help=argparse.SUPPRESS)
        parser.add_argument("--tag", help=argparse.SUPPRESS)

    args = parse_args(NAME, __doc__, argv, add)
    extra = args.extra
    if extra.worker:
        asyncio.run(_worker(extra.data_dir, extra.database_url, extra.conversations, extra.turns, extra.tag))
        return 0
    asyncio.run(run(args.smoke, extra.database_url)).emit(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
