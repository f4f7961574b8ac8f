"""The fast f144 and ev44 decoders give exactly what streaming_data_types gives, corrupted
or not."""

from __future__ import annotations

import numpy as np
import pytest
from streaming_data_types.eventdata_ev44 import deserialise_ev44, serialise_ev44
from streaming_data_types.logdata_f144 import deserialise_f144, serialise_f144

from consumers.wire import decode_ev44, decode_f144

_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)


def _library(buf: bytes) -> tuple[object, ...]:
    try:
        log = deserialise_f144(buf)
    except Exception as exc:
        return ("error", type(exc).__name__)
    return ("ok", log.source_name, log.value, log.timestamp_unix_ns)


def _fast(buf: bytes) -> tuple[object, ...]:
    try:
        name, value, t = decode_f144(buf)
    except Exception as exc:
        return ("error", type(exc).__name__)
    return ("ok", name, value, t)


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    if a[0] != b[0] or len(a) != len(b):
        return False
    if a[0] == "error":
        return a == b
    va, vb = np.asarray(a[2]), np.asarray(b[2])
    values = va.shape == vb.shape and bool(np.all((va == vb) | (np.isnan(va) & np.isnan(vb))))
    return a[1] == b[1] and a[3] == b[3] and values and type(a[2]) is type(b[2])


def _message(rng: np.random.Generator) -> bytes:
    kind = rng.integers(0, 4)
    if kind == 0:
        value: object = float(rng.normal() * 10.0 ** rng.integers(-3, 6))
    elif kind == 1:
        value = np.float32(rng.normal())
    elif kind == 2:
        t = _TYPES[rng.integers(len(_TYPES))]
        info = np.iinfo(t)
        value = t(rng.integers(max(info.min, -(2**62)), min(info.max, 2**62)))
    else:
        value = rng.normal(size=rng.integers(1, 5))
    name = rng.choice(["proton_charge", "omega", "omega_setpoint", "temperatüre", ""])
    return bytes(serialise_f144(str(name), value, int(rng.integers(0, 2**62))))


@pytest.mark.parametrize("seed", range(4))
def test_fast_f144_equals_the_library(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_corrupt = 0
    for _ in range(2500):
        buf = bytearray(_message(rng))
        assert _same(_fast(bytes(buf)), _library(bytes(buf)))
        how = rng.integers(0, 3)
        if how == 0:  # flip a few bytes
            for i in rng.integers(0, len(buf), rng.integers(1, 4)):
                buf[i] = int(rng.integers(0, 256))
        elif how == 1:  # truncate
            buf = buf[: rng.integers(0, len(buf))]
        else:  # overwrite an offset with something large
            i = int(rng.integers(0, max(1, len(buf) - 4)))
            buf[i : i + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
        fast, lib = _fast(bytes(buf)), _library(bytes(buf))
        assert _same(fast, lib), (bytes(buf).hex(), fast, lib)
        n_corrupt += lib[0] == "error"
    assert n_corrupt > 100  # the corruptions do make the library fail often


@pytest.mark.parametrize("seed", range(2))
def test_known_f144_layouts_decode_as_the_library(seed: int) -> None:
    """A producer's repeated layout is read by the shortcut; a byte changed anywhere
    (inside the value or timestamp or in what decides the layout) still gives exactly
    what the library gives."""
    import consumers.wire as wire

    rng = np.random.default_rng(100 + seed)
    hits = wire.f144_layout_hits
    names = ("proton_charge", "omega", "omega_setpoint")
    for i in range(3000):
        name = names[i % 3]
        value: object = float(rng.normal() * 30.0) if i % 2 else int(rng.integers(-(2**40), 2**40))
        buf = bytearray(serialise_f144(name, value, int(rng.integers(0, 2**62))))
        if i % 4 == 3:  # corrupt a byte anywhere
            buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
        fast, lib = _fast(bytes(buf)), _library(bytes(buf))
        assert _same(fast, lib), (bytes(buf).hex(), fast, lib)
    assert wire.f144_layout_hits - hits > 1500  # the shortcut is taken


def test_fast_f144_is_used_for_the_scalar_logs() -> None:
    buf = bytes(serialise_f144("proton_charge", 2.5, 17))
    assert decode_f144(buf) == ("proton_charge", 2.5, 17)
    with pytest.raises(Exception, match="f144"):
        decode_f144(b"\x08\x00\x00\x00ev44" + bytes(16))


def test_deeply_nested_json_is_refused_before_it_is_parsed() -> None:
    """symfc raises the recursion limit to 100,000 for the whole process; a run start or a
    bluesky document nested that deep must be refused, not overflow the C stack."""
    import sys

    from consumers.wire import MAX_JSON_DEPTH, loads_json

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        deep = '{"material": ' + "[" * 100_000 + "]" * 100_000 + "}"
        with pytest.raises(ValueError, match="nested deeper"):
            loads_json(deep)
        with pytest.raises(ValueError, match="nested deeper"):
            loads_json(deep.encode())
    finally:
        sys.setrecursionlimit(old)
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_json(ok) is not None
    # brackets in strings are counted, but real documents stay far below the limit
    assert loads_json('["start", {"plan_name": "scan[[[", "n": [1, [2, [3]]]}]')[0] == "start"


def _ev44_library(buf: bytes) -> tuple[object, ...]:
    try:
        ev = deserialise_ev44(buf)
    except Exception as exc:
        return ("error", type(exc).__name__)
    return ("ok", ev.reference_time, ev.reference_time_index, ev.time_of_flight, ev.pixel_id)


def _ev44_fast(buf: bytes) -> tuple[object, ...]:
    try:
        return ("ok", *decode_ev44(buf))
    except Exception as exc:
        return ("error", type(exc).__name__)


def _ev44_same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    if a[0] != b[0] or len(a) != len(b):
        return False
    if a[0] == "error":
        return a == b
    for x, y in zip(a[1:], b[1:], strict=True):
        if isinstance(x, np.ndarray) != isinstance(y, np.ndarray):
            return False
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            if x.dtype != y.dtype or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("seed", range(3))
def test_fast_ev44_equals_the_library(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_corrupt = 0
    for _ in range(1500):
        n_pulses = int(rng.integers(0, 4))
        counts = rng.integers(0, 20, n_pulses)
        n = int(counts.sum())
        buf = bytearray(
            serialise_ev44(
                str(rng.choice(["arcs_detector", "", "détecteur"])),
                int(rng.integers(0, 2**40)),
                rng.integers(0, 2**62, n_pulses),
                np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_pulses else [],
                rng.integers(0, 2**31 - 1, n),
                rng.integers(0, 2**31 - 1, n),
            )
        )
        assert _ev44_same(_ev44_fast(bytes(buf)), _ev44_library(bytes(buf)))
        how = rng.integers(0, 3)
        if how == 0:
            for i in rng.integers(0, len(buf), rng.integers(1, 4)):
                buf[i] = int(rng.integers(0, 256))
        elif how == 1:
            buf = buf[: rng.integers(0, len(buf))]
        else:
            i = int(rng.integers(0, max(1, len(buf) - 4)))
            buf[i : i + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
        fast, lib = _ev44_fast(bytes(buf)), _ev44_library(bytes(buf))
        assert _ev44_same(fast, lib), (bytes(buf).hex(), fast, lib)
        n_corrupt += lib[0] == "error"
    assert n_corrupt > 100


# -- bluesky documents as bluesky-kafka publishes them (msgpack + msgpack_numpy) -------------


def _bluesky_kafka(name: str, doc: object) -> bytes:
    """Serialised as bluesky-kafka's Publisher does: ``msgpack.dumps((name, doc))`` after
    ``msgpack_numpy.patch()``, i.e. with ``default=msgpack_numpy.encode``."""
    import msgpack
    import msgpack_numpy

    return msgpack.dumps((name, doc), default=msgpack_numpy.encode)


def _run_documents() -> list[tuple[str, dict]]:
    """A run's documents from event_model, an Event holding a numpy image and scalars."""
    import event_model

    bundle = event_model.compose_run(uid="3c5ad2ba-0b7b-4f2b-9b8f-0c7d7a3f3e01", time=1.0)
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "omega": {"source": "sim", "dtype": "number", "shape": []},
            "image": {"source": "sim", "dtype": "array", "shape": [3, 4]},
        },
        time=1.0,
    )
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    event = desc.compose_event(
        data={"omega": np.float64(12.5), "image": image},
        timestamps={"omega": 1.5, "image": 1.5},
        seq_num=1,
        time=1.5,
    )
    stop = bundle.compose_stop(exit_status="success", time=2.0)
    return [
        ("start", dict(bundle.start_doc)),
        ("descriptor", dict(desc.descriptor_doc)),
        ("event", dict(event)),
        ("stop", dict(stop)),
    ]


def test_bluesky_kafka_documents_decode_with_their_numpy_arrays() -> None:
    from consumers.reduction.pipeline import schema_of
    from consumers.wire import decode_bluesky, msgpack_document_name

    for name, doc in _run_documents():
        payload = _bluesky_kafka(name, doc)
        assert msgpack_document_name(payload) == name
        assert schema_of((), payload) == "bluesky-msgpack"
        got_name, got = decode_bluesky("bluesky-msgpack", payload)
        assert got_name == name
        assert got["uid"] == doc["uid"]
        if name == "event":
            image = got["data"]["image"]
            assert image.dtype == np.uint16
            np.testing.assert_array_equal(image, np.arange(12).reshape(3, 4))
            assert got["data"]["omega"] == 12.5
    # a header still wins, and flatbuffers are still recognised by their file identifier
    payload = _bluesky_kafka("start", {"uid": "x"})
    assert schema_of((("schema", b"bluesky-json"),), payload) == "bluesky-json"
    assert schema_of((), serialise_f144("omega", 1.0, 0)) == "f144"
    assert schema_of((), b"\x92\xa4nope\x80") == "unknown"  # not a document name
    assert schema_of((), b"") == "unknown"


def test_the_document_names_are_event_models() -> None:
    import event_model

    from consumers.wire import BLUESKY_DOCUMENT_NAMES

    assert {d.name for d in event_model.DocumentNames} == BLUESKY_DOCUMENT_NAMES


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        # an object array: msgpack_numpy would unpickle its data
        (lambda: _bluesky_kafka("event", {"data": np.array([{"a": 1}], dtype=object)}), "kind"),
        # numpy bytes of another length than the shape says
        (
            lambda: _bluesky_kafka(
                "event",
                {"x": {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [4], b"data": b"1"}},
            ),
            "bytes of data",
        ),
        (lambda: _bluesky_kafka("event", {"x": {b"nd": True, b"type": "O", b"data": b""}}), "O"),
        (lambda: _bluesky_kafka("start", {"uid": "x"})[:-3], "."),  # truncated
        (lambda: b"\x92\xa5start\xc7\x01\x05x", "extension"),  # an ext type
        (lambda: _bluesky_kafka("start", [[[[1]]]]), "pair"),  # a document that is no map
        (lambda: b"\x92\xa5start" + b"\x91" * 300 + b"\x00", "nested deeper"),
        (lambda: b"\x92\xa5start" + b"\x91" * 100_000 + b"\x00", "nested deeper"),
    ],
)
def test_malformed_msgpack_is_refused_without_unpickling(payload, match) -> None:  # type: ignore[no-untyped-def]
    import pickle

    from consumers.wire import decode_bluesky

    calls: list[object] = []
    real = pickle.loads

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        return real(*args, **kwargs)

    pickle.loads = spy  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match=match):
            decode_bluesky("bluesky-msgpack", payload())
    finally:
        pickle.loads = real
    assert calls == []


def test_ev44_source_reads_the_name_as_the_library_does() -> None:
    import numpy as np
    from streaming_data_types.eventdata_ev44 import deserialise_ev44, serialise_ev44

    from consumers.wire import ev44_source

    for name in ("arcs_detector", "ARCS-SpGon:MC-RotY-01", "", "détecteur"):
        buf = bytes(
            serialise_ev44(
                name,
                7,
                np.array([1, 2], dtype=np.int64),
                np.array([0, 1], dtype=np.int32),
                np.array([10, 20, 30], dtype=np.int32),
                np.array([1, 2, 3], dtype=np.int32),
            )
        )
        assert ev44_source(buf) == deserialise_ev44(buf).source_name == name
