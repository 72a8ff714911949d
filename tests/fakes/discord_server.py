"""A small fake Discord (REST + websocket gateway) on 127.0.0.1, for running the real bot over the wire.

Just enough of Discord for one guild with one text channel (or, for sharded bots, ``guild_ids`` guilds with one
text channel each, spread over ``shard_count`` shards by Discord's rule ``(guild_id >> 22) % shard_count``; each
event goes only to the connection of the shard that owns its guild): the gateway handshake (HELLO, IDENTIFY,
READY, GUILD_CREATE), heartbeats, dispatching events, and the REST routes the bot uses (users/@me, the application,
gateway/bot, threads from messages, messages as JSON or multipart, edits, typing, command sync, button presses with their interaction callbacks and follow-ups) plus a CDN for
attachments. Replies carry exactly ``Content-Type: application/json`` (discord.py compares it verbatim), and
injected 429s carry a ``Via`` header (without one, discord.py takes a 429 for a Cloudflare ban)::

    server = start_in_thread()
    env["DISCORD_API_BASE"], env["DISCORD_GATEWAY_URL"] = server.api_base, server.gateway_url
    ... start the bot ...
    server.wait_for(lambda s: s.identified, timeout=20)
    server.call(server.fake.user_message, "<@1000> hello", attachments=[("a.png", png, "image/png")])
    server.wait_for(lambda s: s.requests_to("POST", "/threads"), timeout=20)
    server.stop()

Every REST request is recorded in ``requests`` (method, path, JSON body, uploaded file names, status, arrival
time).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web

__all__ = ["BOT_ID", "CHANNEL_ID", "GUILD_ID", "USER_ID", "FakeDiscord", "RecordedRequest", "ThreadedDiscord", "start_in_thread"]

BOT_ID = 1000
GUILD_ID = 2000
CHANNEL_ID = 3000
USER_ID = 4000
APPLICATION_ID = BOT_ID
HEARTBEAT_MS = 1000
_T = TypeVar("_T")
_PAYLOAD: web.RequestKey[Any] = web.RequestKey("payload", object)
_FILES = web.RequestKey("files", list[tuple[str, bytes]])


@dataclass
class RecordedRequest:
    method: str
    path: str
    json: Any
    files: list[str]
    status: int
    at: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    retry_after: float


@dataclass
class FakeDiscord:
    """The server and its state. ``base_url`` is set once it listens."""

    base_url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    gateway_events: list[str] = field(default_factory=list)
    heartbeats: int = 0
    identified: bool = False
    faults: list[_Fault] = field(default_factory=list)
    guild_ids: list[int] = field(default_factory=lambda: [GUILD_ID])
    shard_count: int = 1
    max_concurrency: int = 1
    identifies: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic(), shard id)
    # What the bot answered to each interaction (by token): its callback, then its follow-ups.
    interaction_replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    attachment_gate: asyncio.Event | None = None  # while set and not yet fired, downloads wait for it
    _cdn: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _socket_shards: dict[int, int] = field(default_factory=dict)  # id(socket) -> shard id
    _pressed: dict[str, int] = field(default_factory=dict)  # interaction token -> the message pressed
    _sequence: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(10_000))
    _runner: web.AppRunner | None = None

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/gateway"

    async def __aenter__(self) -> FakeDiscord:
        for guild_id in self.guild_ids:
            channel_id = self.channel_of(guild_id)
            self.channels[channel_id] = {
                "id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": "general", "position": 0,
                "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None, "last_message_id": None,
                "rate_limit_per_user": 0,
            }
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        api = "/api/v10"
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get(f"{api}/users/@me", self._me)
        app.router.add_get(f"{api}/oauth2/applications/@me", self._application)
        app.router.add_get(f"{api}/gateway/bot", self._gateway_bot)
        app.router.add_get(f"{api}/gateway", self._gateway_bot)
        app.router.add_get(f"{api}/channels/{{channel_id}}", self._get_channel)
        app.router.add_post(f"{api}/channels/{{channel_id}}/messages/{{message_id}}/threads", self._thread_from_message)
        app.router.add_post(f"{api}/channels/{{channel_id}}/messages", self._create_message)
        app.router.add_patch(f"{api}/channels/{{channel_id}}/messages/{{message_id}}", self._edit_message)
        app.router.add_post(f"{api}/channels/{{channel_id}}/typing", self._typing)
        app.router.add_put(f"{api}/applications/{{application_id}}/commands", self._sync_commands)
        app.router.add_post(f"{api}/interactions/{{interaction_id}}/{{token}}/callback", self._interaction_callback)
        app.router.add_post(f"{api}/webhooks/{{application_id}}/{{token}}", self._followup)
        app.router.add_get("/attachments/{key:.+}", self._attachment)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ test API

    @staticmethod
    def channel_of(guild_id: int) -> int:
        """The text channel of a guild: ``CHANNEL_ID`` for ``GUILD_ID``, and as far from it for the others."""
        return CHANNEL_ID + (guild_id - GUILD_ID)

    def shard_of(self, guild_id: int) -> int:
        return (guild_id >> 22) % self.shard_count

    def fail_next(self, method: str, path_regex: str, *, status: int = 429, retry_after: float = 0.2) -> None:
        """Answer the next request matching ``method`` and ``path_regex`` with ``status`` (once)."""
        self.faults.append(_Fault(method, re.compile(path_regex), status, retry_after))

    def requests_to(self, method: str, path_regex: str, *, status: int | None = None) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [
            r for r in self.requests
            if r.method == method and pattern.search(r.path) and (status is None or r.status == status)
        ]

    async def user_message(
        self,
        content: str,
        *,
        channel_id: int = CHANNEL_ID,
        attachments: Sequence[tuple[str, bytes, str]] = (),
        author: tuple[int, str] = (USER_ID, "alice"),
    ) -> dict[str, Any]:
        """A member's message in ``channel_id``, dispatched as MESSAGE_CREATE; mentions are parsed from ``content``.
        ``author`` is the member's (id, name): several simulated users each have their own."""
        message_id = next(self._ids)
        files = []
        for filename, data, content_type in attachments:
            attachment_id = next(self._ids)
            key = f"{channel_id}/{attachment_id}/{filename}"
            self._cdn[key] = (data, content_type)
            url = f"{self.base_url}/attachments/{key}"
            files.append({"id": str(attachment_id), "filename": filename, "size": len(data), "url": url,
                          "proxy_url": url, "content_type": content_type})
        mentions = [_user(int(uid), "hugginggpt", bot=True) for uid in re.findall(r"<@!?(\d+)>", content)
                    if int(uid) == BOT_ID]
        message = self._message(channel_id, _user(*author), content, files)
        message["id"] = str(message_id)
        message["mentions"] = mentions
        message["member"] = {"roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}
        self.messages[message_id] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def click(
        self, message_id: int, custom_id: str, *, user_id: int = USER_ID, name: str = "alice", permissions: int = 0
    ) -> str:
        """A member presses the button ``custom_id`` of a message (INTERACTION_CREATE); returns the
        interaction's token, under which ``interaction_replies`` collects what the bot answered."""
        message = self.messages[message_id]
        channel_id = int(message["channel_id"])
        token = f"token-{next(self._ids)}"
        self.interaction_replies[token] = []
        self._pressed[token] = message_id
        member = {"user": _user(user_id, name), "roles": [], "joined_at": _now(), "deaf": False, "mute": False,
                  "flags": 0, "permissions": str(permissions)}
        await self.dispatch("INTERACTION_CREATE", {
            "id": str(next(self._ids)), "application_id": str(APPLICATION_ID), "type": 3, "token": token,
            "version": 1, "guild_id": str(GUILD_ID), "channel_id": str(channel_id),
            "channel": self.channels.get(channel_id), "member": member, "message": message,
            "data": {"custom_id": custom_id, "component_type": 2}, "app_permissions": "0", "locale": "en-US",
            "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {}, "context": 0,
            "attachment_size_limit": 10 * 1024 * 1024,
        })
        return token

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send ``event`` on every connection, or, for a guild's event, on its shard's connections only."""
        guild_id = data.get("guild_id")
        for ws in list(self._sockets):
            shard = self._socket_shards.get(id(ws))
            if guild_id is None or shard is None or shard == self.shard_of(int(guild_id)):
                await self._send_event(ws, event, data)

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}, "s": None, "t": None})
        try:
            async for frame in ws:
                payload = json.loads(frame.data)
                op = payload.get("op")
                if op == 1:
                    self.heartbeats += 1
                    await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
                elif op == 2:
                    await self._identify(ws, payload["d"])
        finally:
            self._sockets.remove(ws)
            self._socket_shards.pop(id(ws), None)
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        assert data["token"] == "test-token", "the bot sent the wrong token"
        shard_id, shard_count = data.get("shard") or (0, 1)
        assert shard_count == self.shard_count, f"the bot says {shard_count} shards, the fake has {self.shard_count}"
        self.identifies.append((time.monotonic(), shard_id))
        self._socket_shards[id(ws)] = shard_id
        guilds = [g for g in self.guild_ids if self.shard_of(g) == shard_id]
        await self._send_event(ws, "READY", {
            "v": 10, "user": _user(BOT_ID, "hugginggpt", bot=True), "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
            "session_id": "fake-session", "resume_gateway_url": self.gateway_url,
            "application": {"id": str(APPLICATION_ID), "flags": 0}, "private_channels": [], "relationships": [],
            "shard": [shard_id, shard_count],
        })
        for guild_id in guilds:
            await self._guild_create(ws, guild_id)
        self.identified = True

    async def _guild_create(self, ws: web.WebSocketResponse, guild_id: int) -> None:
        await self._send_event(ws, "GUILD_CREATE", {
            "id": str(guild_id), "name": f"Fake Guild {guild_id}", "owner_id": str(USER_ID), "icon": None, "splash": None,
            "features": [], "emojis": [], "stickers": [], "premium_tier": 0, "member_count": 2, "large": False,
            "unavailable": False, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "preferred_locale": "en-US",
            "system_channel_id": None, "afk_channel_id": None, "afk_timeout": 300, "voice_states": [],
            "presences": [], "threads": [], "stage_instances": [], "guild_scheduled_events": [],
            "roles": [{"id": str(guild_id), "name": "@everyone", "permissions": "1071698660929", "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [dict(c) for c in self.channels.values() if c["type"] == 0 and c["guild_id"] == str(guild_id)],
            "members": [{"user": _user(BOT_ID, "hugginggpt", bot=True), "roles": [], "joined_at": _now(),
                         "deaf": False, "mute": False, "flags": 0}],
        })

    async def _send_event(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._sequence += 1
        self.gateway_events.append(event)
        await ws.send_json({"op": 0, "t": event, "s": self._sequence, "d": data})

    # ------------------------------------------------------------------ REST

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path.startswith("/gateway"):
            return await handler(request)
        arrived = time.monotonic()
        body: Any = None
        files: list[tuple[str, bytes]] = []
        if request.content_type == "application/json":
            body = await request.json()
        elif request.content_type == "multipart/form-data":
            body, files = await _read_multipart(request)
        request[_PAYLOAD], request[_FILES] = body, files
        fault = next((f for f in self.faults if f.method == request.method and f.path.search(request.path)), None)
        response: web.StreamResponse
        if fault is not None:
            self.faults.remove(fault)
            response = _fault_response(fault)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as err:
                response = _json({"message": err.reason, "code": 0}, status=err.status)
        self.requests.append(
            RecordedRequest(request.method, request.path, body, [n for n, _ in files], response.status, arrived)
        )
        return response

    async def _me(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bot test-token":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json(_user(BOT_ID, "hugginggpt", bot=True))

    async def _application(self, request: web.Request) -> web.Response:
        return _json({
            "id": str(APPLICATION_ID), "name": "hugginggpt", "description": "", "icon": None, "bot_public": True,
            "bot_require_code_grant": False, "owner": _user(USER_ID, "alice"), "team": None, "verify_key": "00",
            "flags": 0, "interactions_endpoint_url": None,
        })

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url, "shards": self.shard_count, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": self.max_concurrency}})

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self.channels.get(int(request.match_info["channel_id"]))
        if channel is None:
            return _json({"message": "Unknown Channel", "code": 10003}, status=404)
        return _json(channel)

    async def _thread_from_message(self, request: web.Request) -> web.Response:
        parent = int(request.match_info["channel_id"])
        body = request[_PAYLOAD] or {}
        thread_id = int(request.match_info["message_id"])  # Discord gives a thread started on a message its id
        thread = {
            "id": str(thread_id), "type": 11, "guild_id": self.channels[parent]["guild_id"], "parent_id": str(parent),
            "name": body["name"], "owner_id": str(BOT_ID), "message_count": 0, "member_count": 1,
            "rate_limit_per_user": 0, "flags": 0, "last_message_id": None,
            "thread_metadata": {"archived": False, "auto_archive_duration": body.get("auto_archive_duration", 1440),
                                "archive_timestamp": _now(), "locked": False},
        }
        self.channels[thread_id] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json(thread, status=201)

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel_id"])
        if channel_id not in self.channels:
            return _json({"message": "Unknown Channel", "code": 10003}, status=404)
        body = request[_PAYLOAD] or {}
        message = self._message(channel_id, _user(BOT_ID, "hugginggpt", bot=True), body.get("content") or "",
                                self._store_files(channel_id, request[_FILES]))
        message["components"] = body.get("components") or []
        self.messages[int(message["id"])] = message
        return _json(message)

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self.messages.get(int(request.match_info["message_id"]))
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        body = request[_PAYLOAD] or {}
        if "content" in body:
            message["content"] = body["content"]
        if "components" in body:
            message["components"] = body["components"] or []
        if request[_FILES]:
            message["attachments"] = self._store_files(int(message["channel_id"]), request[_FILES])
        message["edited_timestamp"] = _now()
        return _json(message)

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        """Type 4 answers with a message, type 7 edits the message whose button was pressed."""
        body = request[_PAYLOAD] or {}
        token = request.match_info["token"]
        self.interaction_replies.setdefault(token, []).append(body)
        data = body.get("data") or {}
        if body.get("type") == 7 and "components" in data:
            self.messages[self._pressed[token]]["components"] = data["components"]
        return _json({"interaction": {
            "id": request.match_info["interaction_id"], "type": 3, "response_message_id": None,
            "response_message_loading": False, "response_message_ephemeral": bool(data.get("flags", 0) & 64),
        }})

    async def _followup(self, request: web.Request) -> web.Response:
        body = request[_PAYLOAD] or {}
        self.interaction_replies.setdefault(request.match_info["token"], []).append(body)
        message = self._message(CHANNEL_ID, _user(BOT_ID, "hugginggpt", bot=True), body.get("content") or "", [])
        return _json(message)

    async def _typing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _sync_commands(self, request: web.Request) -> web.Response:
        commands = [
            {**c, "id": str(next(self._ids)), "application_id": str(APPLICATION_ID), "version": "1",
             "default_member_permissions": None, "type": c.get("type", 1),
             "description": c.get("description", "")}  # Discord sends "" for context menus
            for c in request[_PAYLOAD] or []
        ]
        return _json(commands)

    async def _attachment(self, request: web.Request) -> web.Response:
        if self.attachment_gate is not None:
            await self.attachment_gate.wait()
        stored = self._cdn.get(request.match_info["key"])
        if stored is None:
            return web.Response(status=404)
        data, content_type = stored
        return web.Response(body=data, headers={"Content-Type": content_type})

    def _store_files(self, channel_id: int, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        out = []
        for filename, data in files:
            attachment_id = next(self._ids)
            key = f"{channel_id}/{attachment_id}/{filename}"
            self._cdn[key] = (data, "application/octet-stream")
            url = f"{self.base_url}/attachments/{key}"
            out.append({"id": str(attachment_id), "filename": filename, "size": len(data), "url": url, "proxy_url": url})
        return out

    def _message(self, channel_id: int, author: dict[str, Any], content: str, attachments: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": str(next(self._ids)), "channel_id": str(channel_id), "guild_id": self.channels[channel_id]["guild_id"],
            "author": author,
            "content": content, "timestamp": _now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": attachments,
            "embeds": [], "pinned": False, "type": 0, "flags": 0, "components": [],
        }


async def _read_multipart(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
    payload: Any = None
    files: list[tuple[str, bytes]] = []
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "payload_json":
            payload = json.loads(await part.text())
        elif part.filename:
            files.append((part.filename, bytes(await part.read())))
    return payload, files


def _fault_response(fault: _Fault) -> web.Response:
    if fault.status == 429:
        return _json(
            {"message": "You are being rate limited.", "retry_after": fault.retry_after, "global": False},
            status=429,
            headers={"Via": "1.1 google", "Retry-After": str(fault.retry_after), "X-RateLimit-Scope": "user"},
        )
    return _json({"message": "injected server error", "code": 0}, status=fault.status)


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )


def _user(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name, "avatar": None,
            "bot": bot, "public_flags": 0, "flags": 0}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


@dataclass
class ThreadedDiscord:
    """A ``FakeDiscord`` on its own loop in a daemon thread, for a bot running in another process."""

    fake: FakeDiscord
    loop: asyncio.AbstractEventLoop
    stop: Callable[[], None]

    @property
    def api_base(self) -> str:
        return self.fake.api_base

    @property
    def gateway_url(self) -> str:
        return self.fake.gateway_url

    def call(self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self.loop).result(timeout=10)

    def wait_for(self, predicate: Callable[[FakeDiscord], object], *, timeout: float) -> None:
        """Poll ``predicate(fake)`` until it is truthy; ``TimeoutError`` with the request log otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate(self.fake):
            if time.monotonic() > deadline:
                seen = "\n".join(f"  {r.method} {r.path} -> {r.status}" for r in self.fake.requests)
                raise TimeoutError(f"fake Discord: condition not met in {timeout}s; requests so far:\n{seen}")
            time.sleep(0.05)


def start_in_thread(**options: Any) -> ThreadedDiscord:
    """Serve a ``FakeDiscord(**options)`` from a background thread; ``stop()`` shuts it down."""
    fake = FakeDiscord(**options)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    done: asyncio.Future[None] = loop.create_future()

    async def main() -> None:
        async with fake:
            ready.set()
            await done

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(timeout=10)

    def stop() -> None:
        loop.call_soon_threadsafe(lambda: None if done.done() else done.set_result(None))
        thread.join(timeout=10)
        loop.close()

    return ThreadedDiscord(fake, loop, stop)
