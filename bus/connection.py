"""Typed request / publish / serve over NATS, JetStream events and the task KV bucket."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    BadHeaderError,
    BadSubjectError,
    ConnectionClosedError,
    MaxPayloadError,
    NoRespondersError,
    NoServersError,
)
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from schemas import (
    MESSAGE_TYPES,
    CodecError,
    DeadLetterEvent,
    Message,
    Rejected,
    RequestRejected,
    TransportError,
)
from schemas.codec import MSGPACK, content_type_of, encode, loads, validate

from . import subjects
from .auth import ConnectRefused, NatsAuth, is_refusal, public_url, refusal_sentence

log = structlog.get_logger("hivebus.bus")

M = TypeVar("M", bound=Message)
Handler = Callable[[Any], Awaitable[Message]]

#: How long the audit stream keeps events (resource.usage samples would grow it forever).
EVENTS_MAX_AGE_S = 7 * 24 * 3600
EVENTS_PER_SUBJECT = 100_000
#: How long a durable publish or KV write keeps trying while NATS is away.
RETRY_PATIENCE_S = 120.0
#: How long an event waits for its PubAck before it is sent again (same Nats-Msg-Id).
ACK_TIMEOUT_S = 5.0
#: How many events may be sent and not yet confirmed; beyond it the sender waits for acks.
MAX_UNCONFIRMED = 10_000
#: How long an event is tried when nothing answers on its subject (no stream captures it).
NO_STREAM_PATIENCE_S = 2.0
#: The largest request body hivebus reads; larger ones get Rejected(too_large).
MAX_REQUEST_BYTES = 1024 * 1024


class Bus:
    """One NATS connection with the typed operations every hivebus process needs.

    Create it with ``await Bus.connect(url, name=...)``; it reconnects on its own.
    """

    def __init__(self, nc: Client, *, name: str = ""):
        self.nc = nc
        self.name = name
        self.js = nc.jetstream()
        self._handlers: set[asyncio.Task[None]] = set()
        #: How many times the connection was re-established; a reply awaited across a
        #: reconnect may have been lost with the old connection.
        self.epoch = 0
        self._reconnect_waiters: list[asyncio.Future[None]] = []
        self._publisher = EventPublisher(nc)
        # Fresh Nats-Msg-Ids: unique per Bus by a random prefix, cheaper than a uuid each.
        self._msg_ids = uuid.uuid4().hex[:16]
        self._msg_count = itertools.count()

    def _on_reconnected(self) -> None:
        self.epoch += 1
        # PUBs and PubAcks that were in flight on the old connection may be lost.
        self._publisher.resume()
        waiters, self._reconnect_waiters = self._reconnect_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def reconnected(self) -> None:
        """Wait for the next reconnect."""
        waiter = asyncio.get_running_loop().create_future()
        self._reconnect_waiters.append(waiter)
        await waiter

    @classmethod
    async def connect(cls, url: str, *, name: str, connect_timeout_s: float = 5.0,
                      auth: NatsAuth | None = None) -> Bus:
        """Connect to NATS at ``url`` with ``auth``'s credentials and TLS files.

        A server that refuses the credentials (or wants TLS the options do not give)
        raises TransportError at once with a sentence; an unreachable one is retried.
        """
        holder: list[Bus] = []
        connecting = [True]

        async def on_error(exc: Exception) -> None:
            # nats-py retries a refused first connect forever (max_reconnect_attempts=-1);
            # raising from its error callback is the way to stop it.
            if connecting[0] and is_refusal(exc):
                raise ConnectRefused(exc)
            log.warning("nats error", error=str(exc), client=name)

        async def on_disconnected() -> None:
            if holder:
                holder[0]._publisher.pause()

        async def on_reconnected() -> None:
            log.info("nats reconnected", client=name)
            if holder:
                holder[0]._on_reconnected()

        options = auth.connect_options() if auth is not None else {}
        nc = Client()
        try:
            await nc.connect(
                servers=[url],
                name=name,
                connect_timeout=connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                # Keep publishes made while the server restarts and send them after.
                pending_size=64 * 1024 * 1024,
                **options,
            )
        except ConnectRefused as refused:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except (asyncio.TimeoutError, NatsError, OSError):
                pass  # a TLS handshake that failed may never report its socket closed
            raise TransportError(refusal_sentence(public_url(url), auth, refused.error)) from None
        except (NoServersError, OSError, asyncio.TimeoutError) as exc:
            raise TransportError(
                f"cannot reach NATS at {public_url(url)}: {exc or type(exc).__name__}") from None
        connecting[0] = False
        bus = cls(nc, name=name)
        holder.append(bus)
        return bus

    @property
    def url(self) -> str:
        server = self.nc.connected_url
        return f"{server.scheme}://{server.hostname}:{server.port}" if server else ""

    async def close(self) -> None:
        """Wait (up to 10 s) for the stream to confirm the events sent, then drain."""
        if self.nc.is_connected:
            try:
                await asyncio.wait_for(self.settle(), timeout=10)
            except asyncio.TimeoutError:
                log.warning("events still unconfirmed at close", count=self._publisher.outstanding)
        for task in list(self._handlers):
            task.cancel()
        await self._publisher.stop()
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (ConnectionClosedError, NatsTimeout, asyncio.TimeoutError):
                await self.nc.close()

    # -- requests -----------------------------------------------------------------

    async def request(self, subject: str, message: Message, reply_type: type[M], *,
                      timeout: float = 10.0) -> M:
        """Send a request and return its typed reply; a Rejected reply raises RequestRejected."""
        data, headers = encode(message)
        try:
            msg = await self.nc.request(subject, data, timeout=timeout, headers=headers)
        except NoRespondersError:
            raise TransportError(f"{subject}: nobody is serving this subject") from None
        except (NatsTimeout, asyncio.TimeoutError):
            raise TransportError(f"{subject}: no reply within {timeout:g} s") from None
        except MaxPayloadError:
            raise TransportError(f"{subject}: the message is larger than the server allows") from None
        return decode_reply(subject, msg, reply_type)

    async def call(self, subject: str, message: Message, reply_type: type[M], *,
                   timeout: float = 10.0, patience_s: float = RETRY_PATIENCE_S) -> M:
        """A request that survives a NATS restart: sent again when the connection is
        re-established while it waits, since its reply may have been lost with the old one.

        Only for requests that are safe to repeat (idempotent, or deduplicated by the server).
        """
        deadline = time.monotonic() + patience_s
        while True:
            epoch = self.epoch
            request = asyncio.ensure_future(self.request(subject, message, reply_type, timeout=timeout))
            reconnect = asyncio.ensure_future(self.reconnected())
            try:
                done, _ = await asyncio.wait({request, reconnect}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                request.cancel()  # the caller gave up: so does the request
                raise
            finally:
                reconnect.cancel()
            if request in done:
                try:
                    return request.result()
                except TransportError:
                    if self.nc.is_connected or time.monotonic() > deadline:
                        raise
                    await self._until_connected(deadline)
                    continue
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            log.info("request sent again after a reconnect", subject=subject, epoch=epoch)

    async def _until_connected(self, deadline: float) -> None:
        while not self.nc.is_connected and time.monotonic() < deadline and not self.nc.is_closed:
            await asyncio.sleep(0.05)

    async def retry(self, operation: Callable[[], Awaitable[Any]], *, what: str,
                    patience_s: float = RETRY_PATIENCE_S) -> Any:
        """Run a JetStream operation until it succeeds; NATS may be restarting meanwhile."""
        deadline = time.monotonic() + patience_s
        delay = 0.05
        while True:
            try:
                return await operation()
            except (NatsError, asyncio.TimeoutError) as exc:
                fatal = isinstance(exc, (MaxPayloadError, BadSubjectError)) or self.nc.is_closed
                if fatal or time.monotonic() > deadline:
                    raise TransportError(f"{what}: {exc or type(exc).__name__}") from None
                log.info("retrying", what=what, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def serve(self, subject: str, request_type: type[Message], handler: Handler, *,
                    queue: str = "", concurrent: bool = True) -> Any:
        """Answer requests on ``subject`` (in ``queue`` group) with ``handler``'s typed reply.

        Bad bytes and invalid bodies get a Rejected reply and a ``hivebus.deadletter``
        event; a handler error gets a Rejected reply and a log line with the traceback.
        With ``concurrent`` each request is handled in its own asyncio task, so a slow
        one (a lease that waits) does not hold up the others.
        """

        async def on_msg(msg: Msg) -> None:
            if concurrent:
                task = asyncio.get_running_loop().create_task(self._answer(msg, request_type, handler))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            else:
                await self._answer(msg, request_type, handler)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def _answer(self, msg: Msg, request_type: type[Message], handler: Handler) -> None:
        ctype = content_type_of(msg.data, msg.headers)
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise CodecError("too_large", f"the body has {len(msg.data)} bytes; "
                                              f"{msg.subject} reads at most {MAX_REQUEST_BYTES}")
            request = validate(loads(msg.data, ctype), request_type)
        except CodecError as exc:
            await self._reply(msg, exc.rejected(), ctype)
            await self.dead_letter(msg.subject, exc.code, exc.message, msg.data)
            return
        try:
            # Every log line of the handler carries who is working on what.
            with structlog.contextvars.bound_contextvars(**_context_of(request), agent=self.name):
                reply = await handler(request)
        except RequestRejected as exc:
            reply = Rejected(code=exc.code, message=exc.message)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an agent must answer and stay up, whatever its handler did
            log.exception("handler failed", subject=msg.subject)
            reply = Rejected(code="internal_error", message=f"{msg.subject}: {type(exc).__name__}: {exc}")
        await self._reply(msg, reply, ctype)

    async def _reply(self, msg: Msg, reply: Message, content_type: str) -> None:
        if not msg.reply:
            return
        data, headers = encode(reply, content_type)
        try:
            await self.nc.publish(msg.reply, data, headers=headers)
        except (ConnectionClosedError, MaxPayloadError) as exc:
            log.warning("reply not sent", subject=msg.subject, error=str(exc))

    async def dead_letter(self, subject: str, code: str, message: str, data: bytes) -> None:
        event = DeadLetterEvent(subject=subject, code=code, message=message, size=len(data),
                                head=data[:64].hex())
        await self.emit(subjects.DEADLETTER, event)

    # -- events -------------------------------------------------------------------

    async def publish(self, subject: str, event: Message, *, msg_id: str | None = None) -> None:
        """Publish an event and wait until the audit stream has stored it.

        It goes out behind the events already given to ``publish_soon``, so the stream
        keeps the call order of both. Sent again while NATS is away; the ``Nats-Msg-Id``
        (``msg_id`` or a fresh one) lets the stream drop the copy a retry may send twice.
        Raises TransportError when the stream refuses it or NATS stays away.
        """
        data, headers = encode(event)
        headers["Nats-Msg-Id"] = msg_id or f"{self._msg_ids}-{next(self._msg_count)}"
        stored = asyncio.get_running_loop().create_future()
        self._publisher.put(subject, data, headers, stored)
        await stored

    def publish_soon(self, subject: str, event: Message, *, msg_id: str | None = None) -> None:
        """Publish without waiting; the stream's confirmation is awaited by ``settle``.

        For events on the hot path. Events go out in call order, at the next turn of the
        event loop. Unconfirmed ones are sent again (same ``Nats-Msg-Id``) after a
        reconnect or when their ack is late; an event the stream refuses, or that is
        still unconfirmed after RETRY_PATIENCE_S, is logged as an error and dropped.
        At most MAX_UNCONFIRMED events are in flight: beyond that the sender waits for
        acks and later events wait, in order, in memory; none is dropped.
        """
        data, headers = encode(event)
        headers["Nats-Msg-Id"] = msg_id or f"{self._msg_ids}-{next(self._msg_count)}"
        self._publisher.put(subject, data, headers)

    async def settle(self) -> None:
        """Wait until every event published so far is stored (or given up on)."""
        await self._publisher.settle()

    async def last_event(self, subject: str) -> tuple[bytes, dict[str, str] | None] | None:
        """The newest stored event on exactly ``subject``, or None."""
        async def read() -> Any:
            try:
                return await self.js.get_last_msg(subjects.EVENTS_STREAM, subject)
            except NotFoundError:
                return None

        msg = await self.retry(read, what=f"read {subject}", patience_s=30.0)
        return None if msg is None else (msg.data, msg.headers)

    async def emit(self, subject: str, event: Message) -> None:
        """Publish an event without waiting for the stream (high-rate samples)."""
        data, headers = encode(event)
        await self.nc.publish(subject, data, headers=headers)

    async def subscribe(self, subject: str, event_type: type[M],
                        callback: Callable[[M], Awaitable[None]], *, queue: str = "") -> Any:
        """Live events on ``subject`` as typed messages (undecodable ones are logged and skipped)."""

        async def on_msg(msg: Msg) -> None:
            try:
                event = decode_message(msg, event_type)
            except CodecError as exc:
                log.warning("undecodable event", subject=msg.subject, error=exc.message)
                return
            await callback(event)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def history(self, filter_subject: str, *, idle_s: float = 1.0) -> AsyncIterator[tuple[str, bytes, dict[str, str] | None]]:
        """Every stored event matching ``filter_subject``, oldest first, up to now."""
        sub = await self.js.subscribe(
            filter_subject, stream=subjects.EVENTS_STREAM, ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and info.delivered.stream_seq == 0:
                return
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_s)
                except (NatsTimeout, asyncio.TimeoutError):
                    return
                yield msg.subject, msg.data, msg.headers
                if msg.metadata.num_pending == 0:
                    return
        finally:
            await sub.unsubscribe()

    async def stored_events(self, filter_subject: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(subject, body) of every stored message body matching ``filter_subject``,
        oldest first; bytes that do not decode to a known message are skipped."""
        async for subject, data, headers in self.history(filter_subject):
            try:
                body = loads(data, content_type_of(data, headers))
            except CodecError:
                continue
            if isinstance(body, dict) and body.get("type") in MESSAGE_TYPES:
                yield subject, body

    # -- JetStream setup ----------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create (or update) the events stream on file storage."""
        config = StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=subjects.EVENT_SUBJECTS,
            storage=StorageType.FILE,
            max_age=EVENTS_MAX_AGE_S,
            # resource.usage.<agent> gets a sample a second; keep about a day of them.
            max_msgs_per_subject=EVENTS_PER_SUBJECT,
            duplicate_window=120.0,
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            await self.js.update_stream(config)

    async def tasks_bucket(self) -> KeyValue:
        try:
            return await self.js.key_value(subjects.TASKS_BUCKET)
        except NotFoundError:
            return await self.js.create_key_value(
                bucket=subjects.TASKS_BUCKET, storage=StorageType.FILE, history=1,
                description="hivebus task records, one key per task id",
            )


class _Outgoing:
    """One event on its way to the stream."""

    __slots__ = ("subject", "data", "headers", "stored", "since", "sent_at", "tries", "refused_at")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str],
                 stored: asyncio.Future[None] | None, since: float):
        self.subject = subject
        self.data = data
        self.headers = headers
        #: Resolved when the stream has it, for an awaited ``Bus.publish``; None otherwise.
        self.stored = stored
        self.since = since  # when it was given: patience runs from here
        self.sent_at = 0.0
        self.tries = 0
        self.refused_at = 0.0  # the first "no responders", if any


class EventPublisher:
    """Publishes to JetStream with asynchronous acks, like nats.go's ``PublishAsync``.

    Events are sent in call order by one sender task, each with its own reply subject
    under one inbox; one subscription on that inbox receives the PubAcks. That is a PUB
    per event and no request future or task per event. What is not confirmed within
    ``ack_timeout_s``, or was in flight when the connection was lost, is sent again, in
    its original order and ahead of newer events, with the same ``Nats-Msg-Id`` for the
    stream to drop the copies it already has. While the connection is down nothing is
    sent, so that the resent events are not overtaken by ones buffered meanwhile.
    """

    def __init__(self, nc: Client, *, ack_timeout_s: float = ACK_TIMEOUT_S,
                 max_unconfirmed: int = MAX_UNCONFIRMED, patience_s: float = RETRY_PATIENCE_S,
                 no_stream_patience_s: float = NO_STREAM_PATIENCE_S):
        self.nc = nc
        self.ack_timeout_s = ack_timeout_s
        self.max_unconfirmed = max_unconfirmed
        self.patience_s = patience_s
        self.no_stream_patience_s = no_stream_patience_s
        self._inbox = nc.new_inbox()
        self._outbox: deque[_Outgoing] = deque()  # not sent yet: resends first, then call order
        self._unconfirmed: dict[int, _Outgoing] = {}  # by reply token, in the order sent
        # Refused with "no responders", each waiting for its next try.
        self._backing_off: dict[asyncio.TimerHandle, _Outgoing] = {}
        self._token = 0
        self._wake = asyncio.Event()
        self._idle: list[asyncio.Future[None]] = []
        self._sender: asyncio.Task[None] | None = None
        self._paused = False
        self._stopped = False

    @property
    def outstanding(self) -> int:
        """Events given and not yet stored or given up on."""
        return len(self._outbox) + len(self._unconfirmed) + len(self._backing_off)

    def put(self, subject: str, data: bytes, headers: dict[str, str],
            stored: asyncio.Future[None] | None = None) -> None:
        """Queue an event; ``stored`` (if given) resolves when the stream has it."""
        out = _Outgoing(subject, data, headers, stored, time.monotonic())
        if self._stopped:
            self._give_up(out, "the bus is closed")
            return
        self._outbox.append(out)
        if self._sender is None or self._sender.done():  # not started yet, or it failed
            self._sender = asyncio.get_running_loop().create_task(self._run())
            self._sender.add_done_callback(self._sender_ended)
        self._wake.set()

    async def settle(self) -> None:
        """Wait until nothing is outstanding."""
        if self.outstanding:
            idle = asyncio.get_running_loop().create_future()
            self._idle.append(idle)
            await idle

    def pause(self) -> None:
        """The connection is lost: send nothing until ``resume``."""
        self._paused = True

    def resume(self) -> None:
        """The connection is back: send every unconfirmed event again, ahead of new ones."""
        self._paused = False
        sent = self._requeue(list(self._unconfirmed))
        if sent:
            log.info("events sent again after a reconnect", count=sent)

    async def stop(self) -> None:
        """End the sender; what is still outstanding is reported as not stored."""
        self._stopped = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)

    # -- the sender -------------------------------------------------------------------

    async def _run(self) -> None:
        await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        while True:
            now = time.monotonic()
            while self._outbox and self._sending and len(self._unconfirmed) < self.max_unconfirmed:
                await self._send(self._outbox.popleft(), now)
            self._wake.clear()
            try:
                async with asyncio.timeout(self._until_overdue()):
                    await self._wake.wait()
            except TimeoutError:
                if not self._sending:
                    self._give_up_on_the_expired()
                else:
                    self._resend_overdue()

    async def _send(self, out: _Outgoing, now: float) -> None:
        self._token += 1
        token = self._token
        out.tries += 1
        out.sent_at = now
        self._unconfirmed[token] = out
        try:
            await self.nc.publish(out.subject, out.data, reply=f"{self._inbox}.{token}",
                                  headers=out.headers)
        except (MaxPayloadError, BadSubjectError, BadHeaderError, ConnectionClosedError) as exc:
            del self._unconfirmed[token]
            self._give_up(out, f"{exc or type(exc).__name__}")
            self._check_idle()
        except NatsError as exc:
            # The reconnect buffer is full (or the connection drains): it stays unconfirmed
            # and goes again after a reconnect or its ack timeout.
            log.info("event not sent yet", subject=out.subject, error=str(exc) or type(exc).__name__)

    @property
    def _sending(self) -> bool:
        # nats-py reports the connection lost a moment before its disconnected callback,
        # and re-established a moment before its reconnected callback: both must agree.
        return not self._paused and self.nc.is_connected

    def _until_overdue(self) -> float | None:
        if not self._sending:
            # The reconnect sends them again; until then only patience can run out.
            return self.ack_timeout_s if self.outstanding else None
        if not self._unconfirmed:
            return None
        oldest = next(iter(self._unconfirmed.values()))
        return max(0.0, oldest.sent_at + self.ack_timeout_s - time.monotonic())

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        overdue = []
        for token, out in self._unconfirmed.items():  # oldest first
            if out.sent_at > now - self.ack_timeout_s:
                break
            overdue.append(token)
        sent = self._requeue(overdue)
        if sent:
            log.info("events sent again: no ack in time", count=sent)

    def _give_up_on_the_expired(self) -> None:
        deadline = time.monotonic() - self.patience_s
        reason = f"not stored within {self.patience_s:g} s: NATS is away"
        for token in [t for t, out in self._unconfirmed.items() if out.since < deadline]:
            self._give_up(self._unconfirmed.pop(token), reason)
        if any(out.since < deadline for out in self._outbox):
            waiting = list(self._outbox)
            self._outbox.clear()
            for out in waiting:
                if out.since < deadline:
                    self._give_up(out, reason)
                else:
                    self._outbox.append(out)
        self._check_idle()

    def _requeue(self, tokens: list[int]) -> int:
        """Queue these unconfirmed events ahead of new ones, in the order they were sent,
        or give up on those out of patience; how many were queued."""
        now = time.monotonic()
        again = []
        for token in tokens:
            out = self._unconfirmed.pop(token)
            if now - out.since > self.patience_s:
                self._give_up(out, f"not confirmed within {self.patience_s:g} s")
            else:
                again.append(out)
        self._outbox.extendleft(reversed(again))
        self._wake.set()
        self._check_idle()
        return len(again)

    # -- acks -------------------------------------------------------------------------

    async def _on_ack(self, msg: Msg) -> None:
        try:
            out = self._unconfirmed.pop(int(msg.subject[len(self._inbox) + 1:]))
        except (KeyError, ValueError):
            return  # the ack of a copy already confirmed, or not one of ours
        if msg.data.startswith(b'{"stream"'):  # a PubAck; errors come as {"error": ...}
            if out.stored is not None and not out.stored.done():
                out.stored.set_result(None)
        elif msg.headers and msg.headers.get("Status") == "503":
            self._no_stream(out)
        else:
            error = _pub_ack_error(msg.data)
            if error:
                self._give_up(out, error)
            elif out.stored is not None and not out.stored.done():
                out.stored.set_result(None)
        if self._outbox and len(self._unconfirmed) < self.max_unconfirmed:
            self._wake.set()
        self._check_idle()

    def _no_stream(self, out: _Outgoing) -> None:
        # Nothing answers on the subject: no stream captures it, or (in a cluster) the
        # stream is not back yet. Try for a short while, then report it.
        now = time.monotonic()
        out.refused_at = out.refused_at or now
        if now - out.refused_at > self.no_stream_patience_s:
            self._give_up(out, "no stream stores this subject (no responders)")
            return

        def again() -> None:
            del self._backing_off[handle]
            self._outbox.appendleft(out)
            self._wake.set()

        handle = asyncio.get_running_loop().call_later(min(0.05 * 2 ** out.tries, 1.0), again)
        self._backing_off[handle] = out

    def _give_up(self, out: _Outgoing, reason: str) -> None:
        if out.stored is not None:
            if not out.stored.done():
                out.stored.set_exception(TransportError(f"publish on {out.subject}: {reason}"))
        else:
            log.error("event not stored", subject=out.subject, error=reason,
                      msg_id=out.headers.get("Nats-Msg-Id"))

    def _check_idle(self) -> None:
        if self._idle and not self.outstanding:
            idle, self._idle = self._idle, []
            for waiter in idle:
                if not waiter.done():
                    waiter.set_result(None)

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        # Only stop() ends the sender; anything else must not leave settle() waiting
        # (the next put starts a new sender).
        if task.cancelled():
            reason = "the bus was closed"
        else:
            exc = task.exception()
            if exc is None:
                return
            log.error("event sender failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            reason = f"the event sender failed: {type(exc).__name__}: {exc}"
        for handle in self._backing_off:
            handle.cancel()
        lost = [*self._outbox, *self._unconfirmed.values(), *self._backing_off.values()]
        self._outbox.clear()
        self._unconfirmed.clear()
        self._backing_off.clear()
        for out in lost:
            self._give_up(out, reason)
        self._check_idle()


def _pub_ack_error(data: bytes) -> str:
    """What went wrong according to a PubAck, or "" when it confirms the message."""
    try:
        ack = json.loads(data)
    except ValueError:
        return f"unreadable PubAck {data[:80]!r}"
    if not isinstance(ack, dict):
        return f"unexpected PubAck {data[:80]!r}"
    error = ack.get("error")
    if error is None:
        return ""
    return (error.get("description") if isinstance(error, dict) else None) or str(error)


def _context_of(request: Message) -> dict[str, Any]:
    """The task, iteration and work item a request is about, for log lines."""
    context: dict[str, Any] = {}
    for field in ("task_id", "iteration", "attempt"):
        value = getattr(request, field, None)
        if value is not None:
            context[field] = value
    item = getattr(request, "item", None)
    if item is not None:
        context["work_item"] = item.id
    return context


def decode_message(msg: Msg, into: type[M]) -> M:
    return validate(loads(msg.data, content_type_of(msg.data, msg.headers)), into)


def decode_reply(subject: str, msg: Msg, reply_type: type[M]) -> M:
    try:
        obj = loads(msg.data, content_type_of(msg.data, msg.headers))
    except CodecError as exc:
        raise TransportError(f"{subject}: undecodable reply: {exc.message}") from None
    if isinstance(obj, dict) and obj.get("type") == "Rejected":
        rejected = validate(obj, Rejected)
        raise RequestRejected(subject, rejected.code, rejected.message)
    try:
        return validate(obj, reply_type)
    except CodecError as exc:
        raise TransportError(f"{subject}: unexpected reply: {exc.message}") from None


__all__ = ["Bus", "decode_message", "decode_reply", "MSGPACK"]
