"""Recorded runs: the ordered Kafka messages of one run in a ``.steer`` file.

A recorded run is every message an instrument published during a run (ev44 events, f144
logs, pl72 / 6s4t run start and stop, JSON bluesky documents), in the order they were
consumed, with topic, key, timestamp and headers. Payloads are stored as opaque bytes: this
module never decodes a flatbuffer or a JSON document.

File format, version 1
----------------------
A ``.steer`` file is one gzip stream (RFC 1952, written with :mod:`gzip`), so ``zcat
run.steer`` gives the raw content and a reader needs only the stdlib. All integers are
little-endian; ``u16``/``u32`` unsigned, ``i32``/``i64`` signed two's complement.
The decompressed content is::

    magic            8 bytes   b"STEERRUN"
    version          u16       1
    header_length    u32       length of the JSON header in bytes
    header           UTF-8 JSON object: the run's metadata plus
                               {"format": "steer-recorded-run", "version": 1}
    record*          zero or more message records, in the order they were written
    end marker       u32       0 (a record of length 0)

and each record is::

    record_length    u32       bytes that follow in this record (> 0)
    topic_length     u16       then the topic, UTF-8
    key_length       i32       -1 for a message without key (None); then the key bytes
    timestamp_ns     i64       nanoseconds since the Unix epoch (Kafka's timestamp, ms * 10**6)
    header_count     u16       then, for each header:
        name_length  u16       then the header name, UTF-8
        value_length u32       then the header value bytes
    payload_length   u32       then the payload bytes

The fields of a record must fill exactly ``record_length`` bytes. Nothing may follow the end
marker. A file without the end marker was cut short (a writer that crashed, a partial copy)
and is reported as truncated after the records it does hold have been read.

Reading streams: the header is read when a :class:`RunReader` opens, and messages are
decoded one at a time, so memory does not grow with the size of the file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from simulations.exceptions import RecordingError

__all__ = [
    "FILE_EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAGIC",
    "RecordedMessage",
    "RunReader",
    "RunWriter",
    "read_run",
    "write_run",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"STEERRUN"
FORMAT_NAME: Final = "steer-recorded-run"
FORMAT_VERSION: Final = 1
FILE_EXTENSION: Final = ".steer"

_PREAMBLE = struct.Struct("<8sHI")  # magic, version, header length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_I32_MAX: Final = 0x7FFF_FFFF
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
# topic length + key length + timestamp + header count + payload length
_MIN_RECORD: Final = 2 + 4 + 8 + 2 + 4
_CHUNK: Final = 1 << 20  # read large records in pieces: a corrupt length cannot allocate GiB

Source = str | os.PathLike[str] | IO[bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedMessage:
    """One Kafka message as it was consumed.

    Attributes
    ----------
    topic
        Kafka topic (at most 65535 bytes in UTF-8).
    key
        Message key, or None for a message without key.
    timestamp_ns
        Message timestamp, int64 nanoseconds since the Unix epoch.
    headers
        Kafka headers as (name, value) pairs, in order; names at most 65535 bytes in UTF-8.
    payload
        The message value as published (an ev44/f144/pl72/6s4t flatbuffer or JSON bytes).
    """

    topic: str
    key: bytes | None
    timestamp_ns: int
    headers: tuple[tuple[str, bytes], ...] = ()
    payload: bytes


def _name(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def _after(index: int | None) -> str:
    """ ", after N complete record(s)" for error messages ("" when not in the body)."""
    if index is None:
        return ""
    return f", after {index} complete record{'' if index == 1 else 's'}"


def _open(source: Source, mode: str, failure: str) -> tuple[IO[bytes], bool]:
    """(binary file, whether we opened it and so must close it)."""
    if not isinstance(source, str | os.PathLike):
        return source, False
    try:
        return open(source, mode), True  # closed by the owner's close()
    except FileNotFoundError as exc:
        raise RecordingError(f"{failure}: no such file or folder {os.fspath(source)}") from exc
    except OSError as exc:
        raise RecordingError(f"{failure}: {exc}") from exc


class RunWriter:
    """Write a recorded run, message by message (a context manager).

    Parameters
    ----------
    target
        Path of the ``.steer`` file (created or overwritten), or a binary file object that
        stays open after :meth:`close`.
    metadata
        JSON-serialisable run metadata (run id, instrument, sample...), stored in the header.
        The keys ``"format"`` and ``"version"`` are reserved.
    compresslevel
        gzip level, 0 (none) to 9 (smallest, slowest).

    Notes
    -----
    The end marker is written by :meth:`close`. Leaving a ``with`` block by an exception
    closes the file *without* it, so that the run reads as truncated rather than complete.

    Raises
    ------
    RecordingError
        If the metadata cannot be stored or the file cannot be opened.
    """

    def __init__(
        self,
        target: Source,
        *,
        metadata: dict[str, Any] | None = None,
        compresslevel: int = 6,
    ) -> None:
        self._name = _name(target)
        if not isinstance(compresslevel, int) or not 0 <= compresslevel <= 9:
            raise RecordingError(f"compresslevel must be an integer 0..9, got {compresslevel!r}")
        header = _header_bytes(metadata, self._name)
        self._raw, self._owns_raw = _open(target, "wb", f"cannot create recorded run {self._name}")
        raw = self._raw
        # mtime=0 and no file name in the gzip header: the same messages give the same bytes
        self._gz: gzip.GzipFile | None = gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
        )
        self._n_messages = 0
        self._n_bytes = 0
        self._emit(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header)
        logger.debug("recording run to %s", self._name)

    @property
    def n_messages(self) -> int:
        """Messages written so far."""
        return self._n_messages

    @property
    def n_bytes(self) -> int:
        """Uncompressed bytes written so far, header and framing included (after
        :meth:`close`, the size of ``zcat`` output)."""
        return self._n_bytes

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._gz is None

    def write(self, msg: RecordedMessage) -> None:
        """Append one message.

        Raises
        ------
        RecordingError
            If the writer is closed, or a field does not fit the format (topic or header
            name over 65535 bytes, key over 2**31 - 1 bytes, payload or record over
            2**32 - 1 bytes, more than 65535 headers, timestamp outside int64), or has the
            wrong type. Nothing of that message is written.
        """
        if self._gz is None:
            raise RecordingError(f"cannot write to {self._name}: the writer is closed")
        head, payload = _encode(msg, self._n_messages)
        self._emit(head)
        if payload:
            self._emit(payload)
        self._n_messages += 1

    def write_many(self, messages: Iterable[RecordedMessage]) -> int:
        """Append messages in order; returns how many were written by this call.

        Records are framed first and handed to gzip in one write (much faster than one
        write per message). A message that does not fit the format raises after every
        message before it has been written, as with :meth:`write`.
        """
        if self._gz is None:
            raise RecordingError(f"cannot write to {self._name}: the writer is closed")
        chunks: list[bytes] = []
        n = 0
        try:
            for msg in messages:
                head, payload = _encode(msg, self._n_messages + n)
                chunks.append(head)
                chunks.append(payload)
                n += 1
        finally:
            if chunks:
                self._emit(b"".join(chunks))
            self._n_messages += n
        return n

    def close(self) -> None:
        """Write the end marker and close the file (idempotent)."""
        if self._gz is None:
            return
        self._emit(_U32.pack(0))
        self._finish()
        logger.info(
            "recorded run %s: %d messages, %d bytes uncompressed",
            self._name,
            self._n_messages,
            self._n_bytes,
        )

    def _finish(self) -> None:
        gz, self._gz = self._gz, None
        try:
            if gz is not None:
                gz.close()
        finally:
            if self._owns_raw:
                self._raw.close()

    def _emit(self, data: bytes) -> None:
        assert self._gz is not None
        try:
            self._gz.write(data)
        except OSError as exc:
            raise RecordingError(f"cannot write recorded run {self._name}: {exc}") from exc
        self._n_bytes += len(data)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._gz is not None:
            logger.warning(
                "recorded run %s closed by %s after %d messages, without end marker: "
                "it will read as truncated",
                self._name,
                exc_type.__name__,
                self._n_messages,
            )
            self._finish()


def _header_bytes(metadata: dict[str, Any] | None, name: str) -> bytes:
    metadata = dict(metadata or {})
    reserved = {"format", "version"} & metadata.keys()
    if reserved:
        raise RecordingError(
            f"metadata for {name} uses reserved key(s) {sorted(reserved)}; rename them"
        )
    try:
        text = json.dumps(
            {**metadata, "format": FORMAT_NAME, "version": FORMAT_VERSION},
            ensure_ascii=False,
            allow_nan=False,
            sort_keys=True,
        )
    except (TypeError, ValueError) as exc:
        raise RecordingError(
            f"metadata for {name} is not JSON-serialisable ({exc}); pass str, numbers, "
            "bools, None, lists and dicts with str keys only"
        ) from exc
    header = text.encode("utf-8")
    if len(header) > _U32_MAX:
        raise RecordingError(f"metadata for {name} is {len(header)} bytes; at most 2**32 - 1")
    return header


def _as_bytes(value: object, what: str, where: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise RecordingError(f"{where}: {what} must be bytes, got {type(value).__name__}")


class _Where:
    """Lazily formatted "message N (topic ...)" for error messages (hot path: no f-string)."""

    __slots__ = ("index", "topic")

    def __init__(self, index: int, topic: object) -> None:
        self.index, self.topic = index, topic

    def __format__(self, spec: str) -> str:
        return f"message {self.index} (topic {self.topic!r:.80})"

    def __str__(self) -> str:
        return format(self, "")


def _encode(msg: RecordedMessage, index: int) -> tuple[bytes, bytes]:
    """Framing of one record (length prefix up to the payload length) and its payload."""
    if not isinstance(msg, RecordedMessage):
        raise RecordingError(f"message {index}: expected a RecordedMessage, got {msg!r:.80}")
    where = _Where(index, msg.topic)
    if not isinstance(msg.topic, str):
        raise RecordingError(f"{where}: topic must be str, got {type(msg.topic).__name__}")
    topic = msg.topic.encode("utf-8")
    if len(topic) > _U16_MAX:
        raise RecordingError(
            f"{where}: topic is {len(topic)} bytes in UTF-8; the format allows at most 65535"
        )
    parts = [_U16.pack(len(topic)), topic]
    if msg.key is None:
        parts.append(_I32.pack(-1))
    else:
        key = _as_bytes(msg.key, "key", where)
        if len(key) > _I32_MAX:
            raise RecordingError(f"{where}: key is {len(key)} bytes; at most 2**31 - 1")
        parts += [_I32.pack(len(key)), key]
    ts = msg.timestamp_ns
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise RecordingError(f"{where}: timestamp_ns must be int, got {type(ts).__name__}")
    if not _I64_MIN <= ts <= _I64_MAX:
        raise RecordingError(f"{where}: timestamp_ns {ts} does not fit in int64")
    parts.append(_I64.pack(ts))
    if len(msg.headers) > _U16_MAX:
        raise RecordingError(f"{where}: {len(msg.headers)} headers; at most 65535")
    parts.append(_U16.pack(len(msg.headers)))
    for h, pair in enumerate(msg.headers):
        try:
            hname, hvalue = pair
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"{where}: header {h} is not a (name, value) pair") from exc
        if not isinstance(hname, str):
            raise RecordingError(f"{where}: header {h} name must be str")
        name_b = hname.encode("utf-8")
        value_b = _as_bytes(hvalue, f"header {hname!r} value", where)
        if len(name_b) > _U16_MAX:
            raise RecordingError(f"{where}: header {h} name is {len(name_b)} bytes; max 65535")
        if len(value_b) > _U32_MAX:
            raise RecordingError(f"{where}: header {hname!r} value is over 2**32 - 1 bytes")
        parts += [_U16.pack(len(name_b)), name_b, _U32.pack(len(value_b)), value_b]
    payload = _as_bytes(msg.payload, "payload", where)
    if len(payload) > _U32_MAX:
        raise RecordingError(f"{where}: payload is {len(payload)} bytes; at most 2**32 - 1")
    parts.append(_U32.pack(len(payload)))
    head = b"".join(parts)
    length = len(head) + len(payload)
    if length > _U32_MAX:
        raise RecordingError(f"{where}: record is {length} bytes; at most 2**32 - 1")
    return _U32.pack(length) + head, payload


class RunReader:
    """Read a recorded run, streaming (a context manager; iterate for the messages).

    Parameters
    ----------
    source
        Path of a ``.steer`` file, or a binary file object (left open by :meth:`close`;
        iterating more than once needs it to be seekable).

    Notes
    -----
    The header is read on construction, so :attr:`metadata` costs nothing more. Each
    iteration starts again from the first message and decodes one record at a time.

    Raises
    ------
    RecordingError
        On construction, if the source cannot be opened, is not a gzip stream, does not
        start with the magic bytes, has an unsupported version or a broken header; while
        iterating, if the file is truncated or corrupt (with record index and byte offset
        in the decompressed stream).
    """

    def __init__(self, source: Source) -> None:
        self._name = _name(source)
        self._raw, self._owns_raw = _open(source, "rb", f"cannot open recorded run {self._name}")
        raw = self._raw
        self._gz: gzip.GzipFile | None = gzip.GzipFile(mode="rb", fileobj=raw)
        try:
            self._metadata, self._version = self._read_header()
        except BaseException:
            self.close()
            raise
        self._body_offset = self._gz.tell()

    @property
    def name(self) -> str:
        """The path (or stream name) read."""
        return self._name

    @property
    def metadata(self) -> dict[str, Any]:
        """Run metadata from the header (a copy), without the ``format``/``version`` keys."""
        return json.loads(json.dumps(self._metadata))  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        """Format version of the file."""
        return self._version

    def _read_header(self) -> tuple[dict[str, Any], int]:
        pre = self._read(_PREAMBLE.size, what="the header", index=None)
        if pre[: len(MAGIC)] == MAGIC and len(pre) < _PREAMBLE.size:
            raise RecordingError(
                f"{self._name} is a truncated recorded run: it starts with {MAGIC!r} but ends "
                f"after {len(pre)} bytes, before its header (format version and header "
                "length); the run was cut off while being written, or copied only in part"
            )
        if len(pre) < _PREAMBLE.size or pre[:8] != MAGIC:
            raise RecordingError(
                f"{self._name} is not a recorded run: it does not start with {MAGIC!r} "
                "(written by something other than RunWriter?)"
            )
        _, version, length = _PREAMBLE.unpack(pre)
        if version != FORMAT_VERSION:
            raise RecordingError(
                f"{self._name} is a recorded run of format version {version}; this reader "
                f"supports version {FORMAT_VERSION} only (update ins-steering)"
            )
        raw_header = self._read_exact(length, what="the JSON header", index=None)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordingError(f"{self._name}: the JSON header is corrupt ({exc})") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise RecordingError(
                f"{self._name}: the header does not name the format {FORMAT_NAME!r}"
            )
        header.pop("format")
        header.pop("version", None)
        return header, version

    def __iter__(self) -> Iterator[RecordedMessage]:
        for index, offset, record in self._records():
            yield self._decode(record, index, offset)

    def count(self) -> int:
        """Number of messages, by streaming through the file (checks the end marker too)."""
        return sum(1 for _ in self._records())

    def _records(self) -> Iterator[tuple[int, int, bytes]]:
        """(index, decompressed byte offset of its length prefix, record bytes) per record."""
        gz = self._gz
        if gz is None:
            raise RecordingError(f"cannot read {self._name}: the reader is closed")
        if gz.tell() != self._body_offset:
            try:
                gz.seek(self._body_offset)
            except (OSError, ValueError) as exc:
                raise RecordingError(
                    f"cannot read {self._name} a second time: the stream is not seekable"
                ) from exc
        index = 0
        while True:
            offset = gz.tell()
            prefix = self._read(4, what=f"record {index}", index=index)
            if len(prefix) < 4:
                raise RecordingError(
                    f"{self._name} is truncated: it ends at decompressed byte "
                    f"{offset + len(prefix)}{_after(index)}, without the end marker; the "
                    "recording was cut short (writer stopped early or partial copy)"
                )
            (length,) = _U32.unpack(prefix)
            if length == 0:
                break
            if length < _MIN_RECORD:
                raise RecordingError(
                    f"{self._name} is corrupt: record {index} at decompressed byte {offset} "
                    f"claims {length} bytes, fewer than the {_MIN_RECORD} of an empty message"
                )
            yield index, offset, self._read_exact(length, what=f"record {index}", index=index)
            index += 1
        # Reading past the end marker also makes gzip check its CRC and length trailer.
        if self._read(1, what="the gzip trailer after the end marker", index=index):
            raise RecordingError(
                f"{self._name} is corrupt: data follows the end marker at decompressed byte "
                f"{offset}{_after(index)}"
            )

    def _read(self, n: int, *, what: str, index: int | None) -> bytes:
        assert self._gz is not None
        start = self._gz.tell()
        try:
            return self._gz.read(n)
        except EOFError as exc:
            raise RecordingError(
                f"{self._name} is truncated: the compressed data ends inside {what} "
                f"(decompressed byte {start}{_after(index)}); the recording was cut short "
                "(writer stopped early or partial copy)"
            ) from exc
        except gzip.BadGzipFile as exc:
            if start == 0:
                raise RecordingError(
                    f"{self._name} is not a recorded run: not a gzip stream ({exc})"
                ) from exc
            raise RecordingError(
                f"{self._name} is corrupt in {what} (decompressed byte {start}"
                f"{_after(index)}): {exc}"
            ) from exc
        except (zlib.error, OSError) as exc:
            raise RecordingError(
                f"{self._name} is corrupt in {what} (decompressed byte {start}"
                f"{_after(index)}): {exc}"
            ) from exc

    def _read_exact(self, n: int, *, what: str, index: int | None) -> bytes:
        assert self._gz is not None
        start = self._gz.tell()
        if n <= _CHUNK:
            data = self._read(n, what=what, index=index)
        else:
            pieces, got = [], 0
            while got < n:
                piece = self._read(min(_CHUNK, n - got), what=what, index=index)
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
            data = b"".join(pieces)
        if len(data) < n:
            raise RecordingError(
                f"{self._name} is truncated: {what} at decompressed byte {start} needs {n} "
                f"bytes but the file ends after {len(data)}{_after(index)}; the recording "
                "was cut short (writer stopped early or partial copy)"
            )
        return data

    def _decode(self, record: bytes, index: int, offset: int) -> RecordedMessage:
        view = memoryview(record)
        pos = 0

        def take(n: int, field: str) -> bytes:
            nonlocal pos
            if pos + n > len(view):
                raise RecordingError(
                    f"{self._name} is corrupt: record {index} at decompressed byte {offset} "
                    f"is {len(view)} bytes but its {field} needs {pos + n - len(view)} more"
                )
            out = view[pos : pos + n]
            pos += n
            return out.tobytes()

        try:
            (n_topic,) = _U16.unpack(take(2, "topic length"))
            topic = take(n_topic, "topic").decode("utf-8")
            (n_key,) = _I32.unpack(take(4, "key length"))
            if n_key < -1:
                raise RecordingError(
                    f"{self._name} is corrupt: record {index} at decompressed byte {offset} "
                    f"has key length {n_key}"
                )
            key = None if n_key == -1 else take(n_key, "key")
            (timestamp_ns,) = _I64.unpack(take(8, "timestamp"))
            (n_headers,) = _U16.unpack(take(2, "header count"))
            headers = []
            for h in range(n_headers):
                (n_name,) = _U16.unpack(take(2, f"header {h} name length"))
                hname = take(n_name, f"header {h} name").decode("utf-8")
                (n_value,) = _U32.unpack(take(4, f"header {h} value length"))
                headers.append((hname, take(n_value, f"header {h} value")))
            (n_payload,) = _U32.unpack(take(4, "payload length"))
            payload = take(n_payload, "payload")
        except UnicodeDecodeError as exc:
            raise RecordingError(
                f"{self._name} is corrupt: record {index} at decompressed byte {offset} "
                f"has a topic or header name that is not UTF-8 ({exc})"
            ) from exc
        if pos != len(view):
            raise RecordingError(
                f"{self._name} is corrupt: record {index} at decompressed byte {offset} "
                f"is {len(view)} bytes but its fields fill {pos}"
            )
        return RecordedMessage(
            topic=topic,
            key=key,
            timestamp_ns=timestamp_ns,
            headers=tuple(headers),
            payload=payload,
        )

    def close(self) -> None:
        """Close the file (idempotent); a file object passed in stays open."""
        gz, self._gz = self._gz, None
        try:
            if gz is not None:
                gz.close()
        finally:
            if self._owns_raw:
                self._raw.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_run(
    path: str | os.PathLike[str],
    messages: Iterable[RecordedMessage],
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write ``messages`` (in order) as a recorded run at ``path``; returns their number."""
    with RunWriter(path, metadata=metadata) as writer:
        writer.write_many(messages)
    return writer.n_messages


def read_run(path: str | os.PathLike[str]) -> Iterator[RecordedMessage]:
    """Stream the messages of the recorded run at ``path``.

    The file is opened at the first ``next()`` (errors surface there) and closed when the
    iterator is exhausted or closed. Use :class:`RunReader` for the metadata.
    """
    with RunReader(Path(path)) as reader:
        yield from reader
