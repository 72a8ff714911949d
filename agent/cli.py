"""The ``hugginggpt`` command: ``ask``, ``chat``, ``bot``, ``run``, ``status``, ``catalog refresh`` and
``storage migrate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from storage import Storage, migrate_storage, shown_url

from .errors import AgentError
from .events import Done, Event, ResponseChunk, RunResult
from .logs import configure_logging
from .progress import RunProgress
from .runtime import Runtime, storage_config
from .settings import Settings
from .uploads import Upload, check_upload, check_upload_count

__all__ = ["main"]

log = logging.getLogger(__name__)
PLATFORM = "cli"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    secrets = settings.secrets
    if getattr(args, "to", None):  # the target database's password, given on the command line
        secrets += Settings.from_mapping({"DATABASE_URL": args.to}).secrets
    configure_logging("DEBUG" if getattr(args, "verbose", False) else settings.log_level, secrets)
    command = args.command
    if command == "run":
        command = "bot" if settings.discord_token else "chat"
        args.conversation, args.sync_commands = None, False
    try:
        if command == "bot":
            from bot.app import run_bot

            return run_bot(settings, sync_commands=args.sync_commands)
        runner = {"ask": _ask, "chat": _chat, "status": _status, "catalog": _catalog, "storage": _storage}[command]
        return asyncio.run(runner(args, settings))
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hugginggpt", description="HuggingGPT: an LLM plans over Hugging Face models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="run one request and print the answer")
    ask.add_argument("text")
    ask.add_argument("--attach", action="append", default=[], type=Path, metavar="PATH", help="attach a file (repeatable)")
    ask.add_argument("--conversation", metavar="ID", help="continue (or start) this stored conversation")
    ask.add_argument("--json", action="store_true", help="print exactly one JSON object: the run's trace")
    ask.add_argument("--out", type=Path, metavar="DIR", help="copy the files the run made here")
    ask.add_argument("--dry-run", action="store_true", help="plan and choose models without running them")
    chat = sub.add_parser("chat", help="interactive conversation in the terminal")
    chat.add_argument("--conversation", metavar="ID")
    bot = sub.add_parser("bot", help="run the Discord bot")
    bot.add_argument("--sync-commands", action="store_true", help="register the slash commands with Discord")
    sub.add_parser("run", help="the bot when DISCORD_TOKEN is set, else chat")
    sub.add_parser("status", help="which LLM, backends and database are reachable")
    catalog = sub.add_parser("catalog", help="the model catalog")
    catalog.add_argument("action", choices=["refresh"])
    storage = sub.add_parser("storage", help="the database and the stored files")
    storage_actions = storage.add_subparsers(dest="action", required=True)
    move = storage_actions.add_parser("migrate", help="copy every conversation and file to a PostgreSQL database")
    move.add_argument("--to", required=True, metavar="URL", help="the target: postgresql://user@host:5432/db")
    move.add_argument("--blob-url", metavar="URL", help="also copy the files to this s3://bucket/prefix")
    return p


async def _conversation(rt: Runtime, conversation_id: str | None) -> str:
    return (await rt.storage.open_conversation(PLATFORM, conversation_id=conversation_id)).id


def _read_file(path: Path, max_bytes: int) -> bytes:
    """At most one byte more than ``max_bytes``: enough to refuse an oversized file (or /dev/zero) unread."""
    with path.expanduser().open("rb") as f:
        return f.read(max_bytes + 1)


async def _read_uploads(paths: Sequence[Path], settings: Settings) -> list[Upload]:
    check_upload_count(len(paths))
    uploads = []
    for path in paths:
        try:
            data = await asyncio.to_thread(_read_file, path, settings.max_attachment_bytes)
        except OSError as err:
            raise AgentError(f"{path}: cannot read the file ({err.strerror or err})") from err
        uploads.append(await check_upload(path.name, data, max_bytes=settings.max_attachment_bytes))
    return uploads


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    uploads = await _read_uploads(args.attach, settings)
    rt = await Runtime.start(settings)
    try:
        conversation = await _conversation(rt, args.conversation)
        progress = None if args.json else _TerminalProgress(sys.stderr)
        result = await _run_turn(rt, conversation, args.text, uploads, progress, dry_run=args.dry_run)
        out_dir = args.out or settings.data_dir / "outputs" / conversation
        paths = await _export_files(rt, result, out_dir)
        if args.json:
            trace = result.to_trace(conversation, [str(p) for p in paths])
            trace["backends"] = {s.name: {"live": s.live, "detail": s.detail} for s in await rt.status()}
            print(json.dumps(trace, ensure_ascii=False))
        else:
            for path in paths:
                print(f"file: {path}")
            print(f"conversation: {conversation}", file=sys.stderr)
        return 1 if result.status == "failed" else 0
    finally:
        await rt.close()


async def _run_turn(
    rt: Runtime,
    conversation: str,
    text: str,
    uploads: Sequence[Upload],
    progress: _TerminalProgress | None,
    *,
    dry_run: bool = False,
) -> RunResult:
    result: RunResult | None = None
    async for event in rt.conversations.ask(conversation, text, uploads=uploads, author="terminal", dry_run=dry_run):
        if progress is not None:
            progress.show(event)
        if isinstance(event, Done):
            result = event.result
    assert result is not None, "Conversations.ask always ends with Done"
    return result


async def _export_files(rt: Runtime, result: RunResult, out_dir: Path) -> list[Path]:
    """Copy the run's files under their short names (``out-1-0.png``) so a person can open them."""
    if not result.files:
        return []
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    paths = []
    for res in result.files:
        target = out_dir / res.name
        if res.path is not None:
            await asyncio.to_thread(shutil.copyfile, res.path, target)
        else:
            await asyncio.to_thread(target.write_bytes, await rt.storage.read_resource(res))
        paths.append(target.absolute())
    return paths


class _TerminalProgress:
    """Live progress on a terminal: one line per change, the answer streamed to stdout."""

    def __init__(self, err: TextIO, out: TextIO = sys.stdout) -> None:
        self.err, self.out = err, out
        self.state = RunProgress()
        self._shown: list[str] = []
        self._streaming = False

    def show(self, event: Event) -> None:
        if isinstance(event, ResponseChunk):
            self.out.write(event.text)
            self.out.flush()
            self._streaming = True
            return
        if not self.state.apply(event):
            return
        if isinstance(event, Done):
            if self._streaming:
                self.out.write("\n")
            elif event.result.answer:
                print(event.result.answer, file=self.out)
            if event.result.status != "ok":
                print(f"[{event.result.status}] {event.result.error or ''}".rstrip(), file=self.err)
            return
        lines = self.state.lines(icons=False)
        for line in lines:
            if line not in self._shown:
                print(f"  {line}", file=self.err)
        self._shown = lines


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    rt = await Runtime.start(settings)
    try:
        conversation = await _conversation(rt, args.conversation)
        print(f"HuggingGPT chat (conversation {conversation}). /attach PATH to add a file, /quit to leave.", file=sys.stderr)
        await _report_interrupted(rt, conversation)
        pending: list[Upload] = []
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line.startswith("/attach "):
                try:
                    pending.extend(await _read_uploads([Path(line[8:].strip())], settings))
                    print(f"attached {pending[-1].filename} ({pending[-1].kind})", file=sys.stderr)
                except AgentError as err:
                    print(f"error: {err}", file=sys.stderr)
                continue
            result = await _run_turn(rt, conversation, line, pending, _TerminalProgress(sys.stderr))
            pending = []
            for path in await _export_files(rt, result, settings.data_dir / "outputs" / conversation):
                print(f"file: {path}")
    finally:
        await rt.close()


async def _report_interrupted(rt: Runtime, conversation: str) -> None:
    for run in await rt.storage.unreported_interrupted_runs():
        if run.conversation_id == conversation:
            print(f"note: run {run.id} was interrupted before it finished ({run.error or 'restart'}).", file=sys.stderr)
            await rt.storage.mark_reported(run.id)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    rt = await Runtime.start(settings)
    try:
        for s in await rt.status():
            print(f"{'live' if s.live else 'down':4}  {s.name}: {s.detail}")
    finally:
        await rt.close()
    return 0


async def _storage(args: argparse.Namespace, settings: Settings) -> int:
    """``storage migrate``: copy everything into the target (run again to resume), then say what to set."""
    source = storage_config(settings)
    target = replace(source, database_url=args.to, blob_url=args.blob_url or source.blob_url)
    if target == source:
        print("error: the target is the storage already in use", file=sys.stderr)
        return 1
    async with await Storage.open(source) as src, await Storage.open(target) as dst:
        print(f"copying {src.describe()}\n     to {dst.describe()}", file=sys.stderr)
        report = await migrate_storage(src, dst)
    print(f"copied: {report.summary()}")
    blobs = f" and BLOB_URL={args.blob_url}" if args.blob_url else ""
    print(f"To use it, set DATABASE_URL={shown_url(args.to)} (with its password){blobs}, then restart.")
    return 0


async def _catalog(args: argparse.Namespace, settings: Settings) -> int:
    from .catalog import refresh_catalog

    catalog, path, failed = await refresh_catalog(settings)
    print(f"catalog: {len(catalog)} models in {len(catalog.tasks())} tasks written to {path}")
    if failed:
        print(f"could not list: {', '.join(failed)} (their previous entries are kept)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
