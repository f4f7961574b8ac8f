"""Fast decoding of the f144 and ev44 messages the consumers read most.

A run sends one f144 ``proton_charge`` value per pulse (14 Hz at ESS) beside its motor
logs: tens of thousands of small messages per run, where ``streaming_data_types``' generic
flatbuffers accessors cost tens of microseconds each. :func:`decode_f144` reads the three
fields of a scalar f144 ``LogData`` table (``source_name``, ``timestamp``, ``value``) with
precompiled ``struct`` readers: the same reads the generated flatbuffers code makes, and the
same results (checked against the library, including corrupted buffers, in
``tests/consumers/test_wire.py``). A layout seen before (a producer repeats its own) is
recognised by a byte comparison and only its value and timestamp are read. Anything else
(array values, a buffer the fast path cannot read) goes to
``streaming_data_types.logdata_f144.deserialise_f144``, so errors stay the library's.
:func:`decode_ev44` does the same for the four arrays of an ev44 event message (numpy
views into the buffer, as the library gives), with ``deserialise_ev44`` behind it.

bluesky documents come in two forms: JSON ``[name, doc]`` with a ``schema: bluesky-json``
header (this project's simulator and recorder, :func:`loads_json`), and bluesky-kafka's
Publisher form, ``msgpack.dumps((name, doc), default=msgpack_numpy.encode)`` with no
header (:func:`msgpack_document_name` recognises it, :func:`loads_msgpack` decodes it,
numpy arrays included, never with pickle). :func:`decode_bluesky` takes either.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import msgpack
import numpy as np
from streaming_data_types.eventdata_ev44 import deserialise_ev44
from streaming_data_types.logdata_f144 import deserialise_f144

__all__ = [
    "BLUESKY_DOCUMENT_NAMES",
    "MAX_JSON_DEPTH",
    "MAX_MSGPACK_BYTES",
    "decode_bluesky",
    "decode_ev44",
    "decode_f144",
    "ev44_source",
    "loads_json",
    "loads_msgpack",
    "msgpack_document_name",
]

#: Deepest nesting of arrays and objects accepted in JSON from the wire (run-start metadata,
#: bluesky documents): real documents nest a handful of levels.
MAX_JSON_DEPTH = 256


def loads_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for input from the wire, refusing nesting deeper than ``max_depth``
    before it is parsed (ValueError).

    Python's JSON parser recurses in C once per level, guarded only by the recursion
    limit, and a library imported beside it raises that limit for the whole process (symfc
    sets ``sys.setrecursionlimit(100000)``): a document nested 100,000 deep then overflows
    the C stack and kills the consumer. Brackets inside strings count too, which can only
    make the check stricter than the real nesting.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        b = np.frombuffer(raw, dtype=np.uint8)
        step = (
            (b == ord("[")).astype(np.int64) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
        )
        if int(np.cumsum(step).max()) > max_depth:
            raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(raw)


#: The document names of event-model (``event_model.DocumentNames``; a test keeps them equal).
BLUESKY_DOCUMENT_NAMES = frozenset(
    {
        "bulk_datum",
        "bulk_events",
        "datum",
        "datum_page",
        "descriptor",
        "event",
        "event_page",
        "resource",
        "start",
        "stop",
        "stream_datum",
        "stream_resource",
    }
)

#: Largest msgpack bluesky message decoded, bytes (the consumers' fetch limit is lower).
MAX_MSGPACK_BYTES = 64 << 20

#: numpy dtype kinds accepted from msgpack_numpy arrays: bool, integers, floats, complex
#: (never object "O" or structured "V", whose decoding would need pickle or a descr).
_NUMPY_KINDS = frozenset("biufc")


def _numpy_hook(obj: dict[Any, Any]) -> Any:
    """msgpack_numpy's map convention (``{b"nd": True, b"type": "<f8", b"kind": b"",
    b"shape": [...], b"data": b"..."}``, ``b"nd": False`` for a numpy scalar,
    ``{b"complex": True, b"data": "(1+2j)"}``) decoded without pickle; other maps are
    returned as they are.

    Raises
    ------
    ValueError
        For an array whose dtype is not numeric (object arrays are msgpack_numpy's pickle
        path), whose shape is not a list of sizes, or whose data do not fill its shape.
    """
    if b"nd" in obj:
        kind = obj.get(b"kind", b"")
        descr = obj.get(b"type")
        data = obj.get(b"data")
        if kind not in (b"", "") or not isinstance(descr, str) or not isinstance(data, bytes):
            raise ValueError(f"msgpack_numpy array of kind {kind!r}, type {descr!r} refused")
        dtype = np.dtype(descr)
        if dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
            raise ValueError(f"msgpack_numpy array of dtype {descr!r} refused")
        if obj[b"nd"] is True:
            shape = obj.get(b"shape")
            if not isinstance(shape, list | tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
            ):
                raise ValueError(f"msgpack_numpy array of shape {shape!r}")
            size = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if size * dtype.itemsize != len(data):
                raise ValueError(
                    f"msgpack_numpy array of shape {shape} and dtype {descr} with "
                    f"{len(data)} bytes of data"
                )
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        if len(data) != dtype.itemsize:
            raise ValueError(f"msgpack_numpy scalar of dtype {descr} with {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    if obj.get(b"complex") is True and isinstance(obj.get(b"data"), str | bytes):
        text = obj[b"data"]
        return complex(text.decode() if isinstance(text, bytes) else text)
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} refused")


def _depth(obj: Any, max_depth: int) -> None:
    """Raise ValueError when lists and dicts nest deeper than ``max_depth`` (iterative)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, list | dict):
            if d > max_depth:
                raise ValueError(f"msgpack nested deeper than {max_depth} levels")
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))


def loads_msgpack(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """msgpack from the wire, as bluesky-kafka's Publisher writes it (msgpack with
    ``msgpack_numpy.encode``): strings as str, numpy arrays and scalars decoded by dtype
    and shape, never by pickle.

    Sizes are bounded by the message (``max_str_len`` and friends), extension types are
    refused, and nesting deeper than ``max_depth`` (the limit of :func:`loads_json`) is
    refused; msgpack's C unpacker keeps its own stack, so a deeper message cannot overflow
    the C stack before that check.

    Raises
    ------
    ValueError
        For anything that is not one whole msgpack object within those limits
        (``msgpack`` raises ValueError subclasses for malformed data too).
    """
    raw = bytes(data)
    if len(raw) > MAX_MSGPACK_BYTES:
        raise ValueError(f"msgpack message of {len(raw)} bytes (limit {MAX_MSGPACK_BYTES})")
    n = len(raw)
    try:
        out = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_hook=_numpy_hook,
            ext_hook=_refuse_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
        )
    except msgpack.StackError as exc:
        raise ValueError(f"msgpack nested deeper than {max_depth} levels") from exc
    except (TypeError, KeyError, OverflowError) as exc:  # a map key of an unhashable type...
        raise ValueError(f"malformed msgpack: {exc}") from exc
    _depth(out, max_depth)
    return out


def msgpack_document_name(payload: bytes) -> str | None:
    """The document name of a bluesky-kafka message (msgpack array of 2 whose first item
    is an event-model document name), else None. Reads a few bytes only."""
    if len(payload) < 3 or payload[0] != 0x92:  # fixarray of 2
        return None
    head = payload[1]
    if 0xA0 <= head <= 0xBF:  # fixstr
        start, length = 2, head - 0xA0
    elif head == 0xD9 and len(payload) > 2:  # str 8
        start, length = 3, payload[2]
    else:
        return None
    try:
        name = bytes(payload[start : start + length]).decode()
    except UnicodeDecodeError:
        return None
    return name if name in BLUESKY_DOCUMENT_NAMES else None


def decode_bluesky(schema: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(name, document)`` of a bluesky message of schema ``bluesky-json`` (JSON
    ``[name, doc]``) or ``bluesky-msgpack`` (bluesky-kafka's msgpack ``(name, doc)``).

    Raises
    ------
    ValueError
        For a payload that is not a ``[name, document]`` pair of a known document name.
    """
    if schema == "bluesky-json":
        pair = loads_json(payload)
    elif schema == "bluesky-msgpack":
        pair = loads_msgpack(payload)
    else:
        raise ValueError(f"schema {schema!r} is no bluesky document")
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError("not a [name, document] pair")
    name, doc = pair
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise ValueError("not a [name, document] pair")
    if schema == "bluesky-msgpack" and name not in BLUESKY_DOCUMENT_NAMES:
        raise ValueError(f"{name!r} is no bluesky document name")
    return name, doc


_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_I64 = struct.Struct("<q").unpack_from
# f144 Value union: 1..10 are the scalar tables (Byte ... Double), each one field "value"
_SCALARS = {
    code: struct.Struct("<" + fmt).unpack_from for code, fmt in enumerate("bBhHiIqQfd", start=1)
}
_SIZES = {code: struct.calcsize("<" + fmt) for code, fmt in enumerate("bBhHiIqQfd", start=1)}


def _field(buf: bytes, table: int, vtable: int, vt_size: int, slot: int) -> int:
    """Absolute position of field ``slot`` of a table, or 0 when it is absent."""
    at = 4 + 2 * slot
    if at >= vt_size:
        return 0
    off: int = _U16(buf, vtable + at)[0]
    return table + off if off else 0


def _table(buf: bytes, pos: int) -> tuple[int, int]:
    """(vtable position, vtable size) of the table at ``pos``."""
    vtable = pos - _I32(buf, pos)[0]
    if vtable < 0:
        raise IndexError("vtable outside the buffer")
    return vtable, _U16(buf, vtable)[0]


#: f144 layouts seen, the latest few per buffer length: (the slices outside the value and
#: timestamp, their bytes, value position, value reader, timestamp position, source name);
#: see :func:`decode_f144`
_Layout = tuple[tuple[slice, ...], tuple[bytes, ...], int, Any, int, str]
_F144_LAYOUTS: dict[int, tuple[_Layout, ...]] = {}
_F144_LAYOUTS_MAX = 64
_F144_PER_LENGTH = 4
#: messages decoded by a known layout (tests check that the shortcut is taken)
f144_layout_hits = 0


def _f144_layout(
    buf: bytes,
    spans: list[tuple[int, int]],
    value: tuple[int, int],
    time: tuple[int, int],
    read: Any,
    name: str,
) -> None:
    """Remember the layout of a decoded scalar f144 buffer whose value and timestamp bytes
    overlap none of the bytes its decoding read (``spans``: the offsets, vtables, union
    type and source name), so that a buffer equal to it outside those two fields decodes
    to the same name with its own value and timestamp."""
    (v0, v1), (t0, t1) = value, time
    if v1 > t0 and t1 > v0:
        return
    for a, b in spans:
        if (a < v1 and v0 < b) or (a < t1 and t0 < b):
            return
    (a0, a1), (b0, b1) = sorted((value, time))
    cuts = (slice(0, a0), slice(a1, b0), slice(b1, len(buf)))
    if len(_F144_LAYOUTS) >= _F144_LAYOUTS_MAX:
        with contextlib.suppress(StopIteration, RuntimeError):  # another thread's doing it
            _F144_LAYOUTS.pop(next(iter(_F144_LAYOUTS)), None)
    same_length = _F144_LAYOUTS.get(len(buf), ())[: _F144_PER_LENGTH - 1]
    layout = (cuts, tuple(buf[c] for c in cuts), v0, read, t0, name)
    _F144_LAYOUTS[len(buf)] = (layout, *same_length)


def decode_f144(buf: bytes) -> tuple[str, int | float | object, int]:
    """``(source_name, value, timestamp_unix_ns)`` of an f144 message.

    ``value`` is a Python int or float for the scalar value types (what the library's
    ``LogData.value`` is for them) and the library's numpy array for array types.

    A producer sends the same log with the same layout every time: a buffer whose bytes
    equal those of one decoded before (same length) everywhere except its value and
    timestamp fields takes the same decisions, so those two fields are read directly.
    Layouts whose fields overlap the bytes that decide are never remembered.

    Raises
    ------
    Exception
        Whatever ``deserialise_f144`` raises for a buffer it cannot read.
    """
    global f144_layout_hits
    for cuts, parts, v0, read, t0, name in _F144_LAYOUTS.get(len(buf), ()):
        if buf[cuts[0]] == parts[0] and buf[cuts[1]] == parts[1] and buf[cuts[2]] == parts[2]:
            f144_layout_hits += 1
            return name, read(buf, v0)[0], _I64(buf, t0)[0]
    try:
        if len(buf) < 8 or buf[4:8] != b"f144":
            raise IndexError("not an f144 buffer")
        root = _U32(buf, 0)[0]
        vtable, vt_size = _table(buf, root)
        p_type = _field(buf, root, vtable, vt_size, 2)
        code = buf[p_type] if p_type else 0
        read = _SCALARS.get(code)
        p_value = _field(buf, root, vtable, vt_size, 3)
        if read is None or not p_value:
            raise IndexError("not a scalar value")
        value_pos = p_value + _U32(buf, p_value)[0]
        v_vtable, v_size = _table(buf, value_pos)
        p_scalar = _field(buf, value_pos, v_vtable, v_size, 0)
        value = read(buf, p_scalar)[0] if p_scalar else (0.0 if code >= 9 else 0)
        p_name = _field(buf, root, vtable, vt_size, 0)
        name = ""
        start = length = 0
        if p_name:
            start = p_name + _U32(buf, p_name)[0]
            length = _U32(buf, start)[0]
            if start + 4 + length > len(buf):
                raise IndexError("string outside the buffer")
            name = bytes(buf[start + 4 : start + 4 + length]).decode()
        p_time = _field(buf, root, vtable, vt_size, 1)
        timestamp = _I64(buf, p_time)[0] if p_time else 0
        if p_scalar and p_time and p_name and type(buf) is bytes:
            _f144_layout(
                buf,
                [
                    (0, 8),
                    (root, root + 4),
                    (vtable, vtable + vt_size),
                    (p_type, p_type + 1),
                    (p_value, p_value + 4),
                    (value_pos, value_pos + 4),
                    (v_vtable, v_vtable + v_size),
                    (p_name, p_name + 4),
                    (start, start + 4 + length),
                ],
                (p_scalar, p_scalar + _SIZES[code]),
                (p_time, p_time + 8),
                read,
                name,
            )
        return name, value, timestamp
    except (struct.error, IndexError, UnicodeDecodeError):
        log = deserialise_f144(buf)
        return log.source_name, log.value, log.timestamp_unix_ns


# ev44 Event44Message slots: source_name, message_id, reference_time ([long]),
# reference_time_index ([int]), time_of_flight ([int]), pixel_id ([int])
_EV44_VECTORS = ((2, "<i8", 8), (3, "<i4", 4), (4, "<i4", 4), (5, "<i4", 4))


def _ev44_root(buf: bytes) -> tuple[int, int, int]:
    """(root table, vtable, vtable size) of an ev44 buffer (IndexError when it is none)."""
    if len(buf) < 8 or buf[4:8] != b"ev44":
        raise IndexError("not an ev44 buffer")
    root = _U32(buf, 0)[0]
    vtable, vt_size = _table(buf, root)
    return root, vtable, vt_size


def _ev44_name(buf: bytes, root: int, vtable: int, vt_size: int) -> str:
    """The ev44 ``source_name`` ("" when absent); IndexError or UnicodeDecodeError for one
    outside the buffer or not UTF-8."""
    p_name = _field(buf, root, vtable, vt_size, 0)
    if not p_name:
        return ""
    start = p_name + _U32(buf, p_name)[0]
    length = _U32(buf, start)[0]
    if start + 4 + length > len(buf):
        raise IndexError("string outside the buffer")
    return bytes(buf[start + 4 : start + 4 + length]).decode()


def ev44_source(buf: bytes) -> str:
    """The ``source_name`` of an ev44 message ("" when absent), read without the arrays.

    Raises
    ------
    Exception
        Whatever ``deserialise_ev44`` raises for a buffer the fast path cannot read.
    """
    try:
        return _ev44_name(buf, *_ev44_root(buf))
    except (IndexError, struct.error, UnicodeDecodeError):
        return str(deserialise_ev44(bytes(buf)).source_name)


def decode_ev44(buf: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(reference_time, reference_time_index, time_of_flight, pixel_id)`` of an ev44
    message: int64 pulse times (ns), int32 start index of each pulse's events, int32 times
    of flight (ns) and int32 detector ids, as read-only views into ``buf``.

    The same arrays as ``deserialise_ev44`` (whose generic accessors cost about 100 us a
    message); a buffer the fast path does not read (an absent vector, a bad source name,
    anything out of bounds) goes to the library, so its results and errors stay the
    library's: for an absent vector that is the int 0 in place of an array.

    Raises
    ------
    Exception
        Whatever ``deserialise_ev44`` raises for a buffer it cannot read.
    """
    try:
        n = len(buf)
        root, vtable, vt_size = _ev44_root(buf)
        _ev44_name(buf, root, vtable, vt_size)  # the library decodes it: a bad one is its error
        p_id = _field(buf, root, vtable, vt_size, 1)
        if p_id:  # and reads the message id
            _I64(buf, p_id)
        out = []
        for slot, dtype, size in _EV44_VECTORS:
            pos = _field(buf, root, vtable, vt_size, slot)
            if not pos:
                raise IndexError("absent vector")
            start = pos + _U32(buf, pos)[0]
            count = _U32(buf, start)[0]
            if start + 4 + count * size > n:
                raise IndexError("vector outside the buffer")
            out.append(np.frombuffer(buf, dtype=dtype, count=count, offset=start + 4))
        return out[0], out[1], out[2], out[3]
    except (struct.error, IndexError, UnicodeDecodeError):
        ev = deserialise_ev44(buf)
        return ev.reference_time, ev.reference_time_index, ev.time_of_flight, ev.pixel_id
