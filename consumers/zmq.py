"""bluesky documents over 0MQ for the live consumer.

The run engine publishes its documents with bluesky's own
:class:`bluesky.callbacks.zmq.Publisher` to a 0MQ :class:`~bluesky.callbacks.zmq.Proxy`
(``steer zmq-proxy`` or bluesky's ``bluesky-0MQ-proxy``); :class:`ZmqBlueskySource`
subscribes to the proxy's out port with a :class:`~bluesky.callbacks.zmq.RemoteDispatcher`
running in a background thread and serves the documents through the
:class:`~consumers.messages.MessageSource` protocol, so that
:class:`~consumers.kafka.MergedSource` can combine it with the Kafka topics of the run
(events, motion, run info).

0MQ cannot re-deliver, so every received document is first appended to a journal in the
consumer's state dir (one JSON line ``[seq, name, doc]``, flushed and fsynced) and only then
handed out, with ``seq`` as its offset on the topic ``zmq:<host:port>``. A restarted
consumer seeks to its checkpointed offset and gets every later document again from the
journal. Documents published while no consumer was subscribed are lost (that is 0MQ);
bluesky's Event ``seq_num`` and the RunStop's ``num_events`` reveal them: each missing
document is counted as ``bluesky_gap`` and logged.

A malformed 0MQ message (not ``prefix name body``, a name that is no bluesky document, a
body that does not decode, a document that is not a JSON-representable dict) never stops
the source: it is counted by reason (also in ``steer_messages_malformed_total``), logged
and handed to the dead-letter callback. Pickled documents (bluesky's default) are read by a
restricted unpickler that only rebuilds plain containers, numbers, strings and numpy
arrays, so no code can be run from the network.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import io
import json
import logging
import math
import os
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from event_model import DocumentNames
from zmq.utils.monitor import parse_monitor_message

from consumers import metrics
from consumers.exceptions import ConsumerError
from consumers.messages import SourceMessage
from consumers.wire import loads_json
from simulations.jsonutil import json_default

__all__ = [
    "DESERIALIZERS",
    "JOURNAL",
    "SERIALIZERS",
    "RestrictedUnpickler",
    "ZmqBlueskySource",
    "make_publisher",
    "restricted_loads",
]

logger = logging.getLogger(__name__)

#: Journal file of the received documents, in the state dir.
JOURNAL = "bluesky_zmq.jsonl"

# -- restricted pickle --------------------------------------------------------------------

_SAFE_BUILTINS = frozenset(
    (
        *("dict", "list", "tuple", "set", "frozenset", "slice", "range"),
        *("int", "float", "complex", "bool", "str", "bytes", "bytearray"),
    )
)
_SAFE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),  # protocol-5 arrays
    }
)
# protocol-2 pickles name the builtins __builtin__; numpy < 2 names its private numpy.core
_ALIASES = {
    "__builtin__": "builtins",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds plain builtins and numpy arrays and scalars.

    Any other global (``os.system``, ``builtins.eval``, a class of some module) raises
    :class:`pickle.UnpicklingError`, so a message from the network cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = _ALIASES.get(module, module)
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def restricted_loads(data: bytes) -> Any:
    """:func:`pickle.loads` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _json_dumps(doc: Any) -> bytes:
    return json.dumps(doc, default=json_default).encode()


#: Document body decoders by format name (``msgpack`` only where it is installed).
DESERIALIZERS: dict[str, Callable[[bytes], Any]] = {
    "pickle": restricted_loads,
    "json": loads_json,
}
#: Document body encoders for :func:`make_publisher`, by format name.
SERIALIZERS: dict[str, Callable[[Any], bytes]] = {"pickle": pickle.dumps, "json": _json_dumps}

try:
    import msgpack
except ImportError:  # pragma: no cover - optional
    pass
else:

    def _msgpack_loads(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False)

    def _msgpack_dumps(doc: Any) -> bytes:
        return bytes(msgpack.packb(doc, default=json_default))

    DESERIALIZERS["msgpack"] = _msgpack_loads
    SERIALIZERS["msgpack"] = _msgpack_dumps


def _format(fmt: str) -> str:
    if fmt not in DESERIALIZERS:
        raise ConsumerError(f"0MQ format must be one of {sorted(DESERIALIZERS)}, got {fmt!r}")
    return fmt


def make_publisher(address: str, *, prefix: bytes = b"", fmt: str = "pickle") -> Any:
    """bluesky's :class:`~bluesky.callbacks.zmq.Publisher` to a proxy's in port.

    Its socket lingers at most 5 s on close, so that closing never hangs on a proxy that
    went away. PUB sockets drop what is sent before the connection is up: wait a little
    (about 0.5 s) before the first document.
    """
    pub = Publisher(address, prefix=prefix, serializer=SERIALIZERS[_format(fmt)])
    sock = getattr(pub, "_socket", None)
    if sock is not None:
        sock.setsockopt(zmq.LINGER, 5000)
    return pub


# -- the dispatcher -----------------------------------------------------------------------

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class _Dispatcher(RemoteDispatcher):
    """bluesky's RemoteDispatcher with a ``_poll`` that never prints and never dies.

    Every message that is not ``prefix name body`` with a bluesky document name and a body
    that decodes to a JSON-representable dict goes to ``on_malformed(reason, message,
    detail)``; the good ones are dispatched to the subscribed callbacks as usual. It also
    watches the connection to the proxy (``connected``). CURVE is not supported here.
    """

    _context: Any
    _socket: Any
    _task: Any

    def __init__(
        self,
        address: str,
        *,
        prefix: bytes,
        deserializer: Callable[[bytes], Any],
        on_malformed: Callable[[str, bytes, str], None],
    ) -> None:
        super().__init__(
            address, prefix=prefix, deserializer=deserializer, loop=asyncio.new_event_loop()
        )
        self.on_malformed = on_malformed
        self.ready = threading.Event()
        self.connected = threading.Event()
        #: messages of another publisher's prefix (ignored, as bluesky does)
        self.other_prefix = 0
        self._monitor: Any = None

    def start(self) -> None:
        """Connect and receive until the poll task is cancelled (from the loop's thread)."""
        if self.closed:
            raise ConsumerError("this 0MQ dispatcher was already stopped")
        asyncio.set_event_loop(self.loop)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._monitor = self._socket.get_monitor_socket(_MONITOR_EVENTS)
        self._socket.connect(self.address)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._task = self.loop.create_task(self._poll())
        self.loop.call_soon(self.ready.set)
        try:
            self.loop.run_until_complete(self._task)
        finally:
            self.stop()

    async def _poll(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            for sock, _ in await poller.poll():
                try:
                    if sock == self._monitor:
                        self._monitor_event(await self._monitor.recv_multipart())
                    else:
                        self.receive(await self._socket.recv())
                except asyncio.CancelledError:
                    raise
                except Exception:  # never stop receiving; say loudly what happened
                    logger.exception("%s: 0MQ message could not be processed", self.address)

    def _monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected.set()
            logger.info("connected to the 0MQ proxy at %s", self.address)
        elif event == zmq.EVENT_DISCONNECTED:
            self.connected.clear()
            logger.warning(
                "0MQ proxy at %s disconnected; reconnecting (documents sent meanwhile are "
                "lost and counted as gaps)",
                self.address,
            )

    def receive(self, message: bytes) -> None:
        """One raw 0MQ message: dispatch it, or report why it is malformed."""
        try:
            prefix, name_b, body = message.split(b" ", 2)
        except ValueError:
            self.on_malformed("unsplittable", message, "not 'prefix name document'")
            return
        if self._prefix and prefix != self._prefix:
            self.other_prefix += 1
            return
        try:
            name = DocumentNames(name_b.decode())
        except (UnicodeDecodeError, ValueError):
            self.on_malformed("unknown_document", message, f"{name_b[:64]!r} is no document name")
            return
        try:
            doc = self._deserializer(body)
        except Exception as exc:
            self.on_malformed("undecodable", message, f"{type(exc).__name__}: {exc}")
            return
        if not isinstance(doc, dict):
            self.on_malformed("not_a_document", message, f"{name.name} is a {type(doc).__name__}")
            return
        try:
            json.dumps(doc, default=json_default)
        except (TypeError, ValueError) as exc:
            self.on_malformed("not_json", message, f"{name.name}: {exc}")
            return
        self.process(name, doc)


# -- the source ---------------------------------------------------------------------------


def _timestamp_ns(doc: dict[str, Any]) -> int:
    t = doc.get("time")
    if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t):
        return round(t * 1e9)
    return time.time_ns()


class ZmqBlueskySource:
    """bluesky documents from a 0MQ proxy, journalled, as a :class:`MessageSource`.

    Parameters
    ----------
    address
        The proxy's out port, ``host:port`` (or ``tcp://host:port``).
    state_dir
        The consumer's state dir; the journal :data:`JOURNAL` lives there (one consumer
        at a time: it is locked).
    prefix
        Only documents published with this bluesky prefix (others are ignored).
    deserializer
        ``"pickle"`` (bluesky's default, read by a restricted unpickler), ``"json"`` or
        ``"msgpack"`` (where installed).
    dead_letter
        Called with ``(message, reason)`` for every malformed 0MQ message (its payload is
        the raw message, its offset -1).
    ready_timeout_s
        How long to wait for the receiving thread to start.
    connect_timeout_s
        How long to wait for the connection to the proxy (only a warning when it is not up
        yet: 0MQ keeps trying).
    stop_timeout_s
        :meth:`caught_up` waits for the RunStop of an open run at most this long after the
        last document.

    Notes
    -----
    Offsets are the journal's sequence numbers on the topic ``zmq:<host:port>``, partition
    0; keep the same address across restarts. :meth:`commit` keeps the journal (the
    checkpoint is the source of truth, and documents are few).
    """

    def __init__(
        self,
        address: str,
        state_dir: str | Path,
        *,
        prefix: bytes = b"",
        deserializer: str = "pickle",
        dead_letter: Callable[[SourceMessage, str], None] | None = None,
        ready_timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        host_port = address.split("://", 1)[-1]
        self.address = f"tcp://{host_port}"
        self.topic = f"zmq:{host_port}"
        self.topics = [self.topic]
        self.dead_letter = dead_letter
        self.stop_timeout_s = float(stop_timeout_s)
        #: malformed messages and missing documents, by reason
        self.counters: Counter[str] = Counter()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.state_dir / JOURNAL
        self._cond = threading.Condition()
        self._entries: list[SourceMessage] = []
        self._seqs: list[int] = []
        self._next_seq = 0
        self._pos = 0
        self._closed = False
        self._last_doc = time.monotonic()
        self._warned_open = False
        # gap and run tracking: descriptor uid -> [stream name, last seq_num, run uid]
        self._descriptors: dict[str, list[Any]] = {}
        self._open_runs: set[str] = set()
        self._journal = open(self.journal_path, "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._journal.close()
            raise ConsumerError(f"{self.journal_path} is in use by another consumer") from None
        try:
            self._load()
        except BaseException:
            self._journal.close()
            raise
        self._error: BaseException | None = None
        self._dispatcher = _Dispatcher(
            self.address,
            prefix=bytes(prefix),
            deserializer=DESERIALIZERS[_format(deserializer)],
            on_malformed=self._malformed,
        )
        self._dispatcher.subscribe(self._on_document)
        self._thread = threading.Thread(
            target=self._run, name=f"zmq-bluesky-{host_port}", daemon=True
        )
        self._thread.start()
        if not self._dispatcher.ready.wait(ready_timeout_s) or self._error is not None:
            self.close()
            raise ConsumerError(f"0MQ receiver for {self.address} did not start: {self._error}")
        if connect_timeout_s > 0 and not self._dispatcher.connected.wait(connect_timeout_s):
            logger.warning(
                "not connected to the 0MQ proxy at %s after %.1f s (0MQ keeps trying)",
                self.address,
                connect_timeout_s,
            )

    # -- MessageSource -----------------------------------------------------------------------

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        """Up to ``max_records`` journalled documents, waiting at most ``timeout_s``."""
        with self._cond:
            if self._pos >= len(self._entries) and timeout_s > 0:
                self._cond.wait_for(
                    lambda: self._pos < len(self._entries) or self._closed, timeout_s
                )
            out = self._entries[self._pos : self._pos + max(0, max_records)]
            self._pos += len(out)
        return out

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        """Re-deliver the journal from this source's offset in ``offsets``.

        A checkpoint beyond the journal's end (the journal was lost) makes new documents
        continue after it, so that they are not taken for re-deliveries.
        """
        off = offsets.get((self.topic, 0))
        if off is None:
            return
        with self._cond:
            self._pos = bisect.bisect_left(self._seqs, int(off))
            if int(off) > self._next_seq:
                logger.warning(
                    "%s ends at document %d, the checkpoint at %d (journal lost?); "
                    "numbering continues after the checkpoint",
                    self.journal_path,
                    self._next_seq,
                    off,
                )
                self._next_seq = int(off)
        logger.info("%s: continuing from document %d", self.topic, off)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Nothing to do: the journal is kept, the checkpoint has the offsets."""

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        """Every journalled document is handed out and ``offsets`` reached it, and no run
        is open (started without a RunStop), or ``stop_timeout_s`` passed without a
        document."""
        with self._cond:
            done = self._pos >= len(self._entries) and offsets.get((self.topic, 0), 0) >= (
                self._next_seq
            )
            open_runs = sorted(self._open_runs)
            idle = time.monotonic() - self._last_doc
        if not done:
            return False
        if open_runs:
            if idle < self.stop_timeout_s:
                return False
            if not self._warned_open:
                self._warned_open = True
                logger.warning(
                    "%s: no RunStop for run %s after %.0f s; going on without it",
                    self.topic,
                    ", ".join(open_runs),
                    idle,
                )
        return True

    def close(self) -> None:
        """Stop receiving and release the journal."""
        if self._closed:
            return
        self._closed = True
        d = getattr(self, "_dispatcher", None)
        if d is not None:
            task = d._task
            if task is not None:
                with suppress(RuntimeError):  # the loop is already closed
                    d.loop.call_soon_threadsafe(task.cancel)
            self._thread.join(10)
            if self._thread.is_alive():
                logger.warning("%s: the 0MQ receiver thread did not stop", self.topic)
        with self._cond:
            self._cond.notify_all()
            self._journal.close()

    def __enter__(self) -> ZmqBlueskySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection to the proxy is up."""
        return self._dispatcher.connected.is_set()

    def stats(self) -> dict[str, object]:
        """Counters of this source (JSON-ready)."""
        with self._cond:
            return {
                "topic": self.topic,
                "documents": self._next_seq,
                "delivered_up_to": self._seqs[self._pos - 1] + 1 if self._pos else 0,
                "connected": self.connected,
                "other_prefix": self._dispatcher.other_prefix,
                "counters": dict(self.counters),
            }

    # -- internals ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._dispatcher.start()
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._error = exc
            logger.exception("%s: the 0MQ receiver stopped", self.topic)
        finally:
            self._dispatcher.ready.set()

    def _message(self, seq: int, name: str, doc: dict[str, Any]) -> SourceMessage:
        return SourceMessage(
            topic=self.topic,
            partition=0,
            offset=seq,
            key=None,
            timestamp_ns=_timestamp_ns(doc),
            headers=(("schema", b"bluesky-json"), ("document", name.encode())),
            payload=json.dumps([name, doc], default=json_default).encode(),
        )

    def _load(self) -> None:
        """Read the journal; a torn last line (a crash mid-write) is cut off."""
        self._journal.seek(0)
        data = self._journal.read()
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            logger.warning(
                "%s: torn last line (%d bytes) ignored (a crash while writing it)",
                self.journal_path,
                len(tail),
            )
            self._journal.truncate(len(data) - len(tail))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                seq, name, doc = json.loads(line)
                seq = int(seq)
                DocumentNames(name)
                if not isinstance(doc, dict) or seq < self._next_seq:
                    raise ValueError("not [seq, name, doc] in order")
            except (ValueError, TypeError) as exc:
                logger.warning("%s: line %d unreadable, skipped: %s", self.journal_path, i + 1, exc)
                continue
            self._entries.append(self._message(seq, name, doc))
            self._seqs.append(seq)
            self._next_seq = seq + 1
            self._track(name, doc, live=False)
        if self._entries:
            logger.info("%s: %d documents journalled", self.journal_path, len(self._entries))

    def _on_document(self, name: str, doc: dict[str, Any]) -> None:
        """A received document (on the receiver thread): journal it, then hand it out."""
        try:
            doc = json.loads(json.dumps(doc, default=json_default))
        except (TypeError, ValueError) as exc:  # checked by the dispatcher already
            logger.warning("%s: %s document not JSON-representable: %s", self.topic, name, exc)
            return
        with self._cond:
            if self._closed:
                return
            seq = self._next_seq
            line = json.dumps([seq, name, doc]).encode() + b"\n"
            try:
                self._journal.write(line)
                self._journal.flush()
                os.fsync(self._journal.fileno())
            except Exception:
                self.counters["journal_error"] += 1
                metrics.MESSAGES_MALFORMED.labels("journal_error").inc()
                logger.exception(
                    "%s: journal write failed; document %d (%s) kept in memory only",
                    self.journal_path,
                    seq,
                    name,
                )
            self._next_seq = seq + 1
            self._entries.append(self._message(seq, name, doc))
            self._seqs.append(seq)
            self._last_doc = time.monotonic()
            self._track(name, doc, live=True)
            self._cond.notify_all()

    def _malformed(self, reason: str, message: bytes, detail: str) -> None:
        with self._cond:
            self.counters[reason] += 1
        metrics.MESSAGES_MALFORMED.labels(reason).inc()
        logger.warning(
            "%s: malformed 0MQ message (%s): %s; %d bytes %r",
            self.topic,
            reason,
            detail,
            len(message),
            message[:120],
        )
        if self.dead_letter is not None:
            msg = SourceMessage(
                topic=self.topic,
                partition=0,
                offset=-1,
                key=None,
                timestamp_ns=time.time_ns(),
                headers=(("schema", b"bluesky-0mq"),),
                payload=bytes(message),
            )
            try:
                self.dead_letter(msg, reason)
            except Exception:
                logger.exception("%s: dead-lettering failed", self.topic)

    def _gap(self, n: int, detail: str, live: bool) -> None:
        if n <= 0 or not live:
            return
        self.counters["bluesky_gap"] += n
        metrics.MESSAGES_MALFORMED.labels("bluesky_gap").inc(n)
        logger.warning("%s: %d bluesky document(s) lost over 0MQ: %s", self.topic, n, detail)

    def _track(self, name: str, doc: dict[str, Any], live: bool) -> None:
        """Runs, descriptors and Event ``seq_num``: gaps mean 0MQ dropped documents."""
        try:
            if name == "start":
                self._open_runs.add(str(doc.get("uid")))
            elif name == "descriptor":
                self._descriptors[str(doc.get("uid"))] = [doc.get("name"), 0, doc.get("run_start")]
            elif name in ("event", "event_page"):
                uid = str(doc.get("descriptor"))
                seqs: Any = doc.get("seq_num")
                nums = [int(s) for s in (seqs if isinstance(seqs, list) else [seqs])]
                if uid not in self._descriptors:
                    self._gap(1, f"{name} of unknown descriptor {uid}", live)
                    self._descriptors[uid] = [None, 0, None]
                d = self._descriptors[uid]
                for s in nums:
                    self._gap(s - d[1] - 1, f"Event seq_num {s} after {d[1]} ({uid})", live)
                    d[1] = max(d[1], s)
            elif name == "stop":
                run = doc.get("run_start")
                if str(run) not in self._open_runs:
                    self._gap(1, f"RunStop of unknown run {run}", live)
                self._open_runs.discard(str(run))
                for stream, n in (doc.get("num_events") or {}).items():
                    descs = self._descriptors.values()
                    last = max((d[1] for d in descs if d[0] == stream and d[2] == run), default=0)
                    self._gap(int(n) - last, f"stream {stream!r}: {n} Events, last {last}", live)
        except (TypeError, ValueError, AttributeError) as exc:
            logger.debug("%s: %s document not tracked: %s", self.topic, name, exc)
