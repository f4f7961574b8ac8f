"""Fuzzing the consumer's input (issue 8, item 5).

Hostile ev44, f144, pl72 and 6s4t payloads and bluesky documents, structurally valid (built
with the real ``streaming_data_types`` serialisers) or raw garbage, are fed to the pipeline
(:class:`consumers.reduction.pipeline.RunPipeline`) and to the live consumer
(:class:`consumers.service.ConsumerService`, from an in-memory source: no broker) in the
middle of a real simulated run. The properties:

* nothing raises out of the consumer;
* a refused message is counted under a non-empty reason and dead-lettered once (dead letters
  == malformed counters), logged with its topic, partition and offset, and leaves the
  pipeline's state exactly as it was;
* a message built to be invalid is refused;
* the run still gives exactly the clean offline fold (counts, exposure, orientations, events
  folded), and every accepted hostile event is accounted for as dropped (folded + dropped ==
  events received).

The hostile messages come from :func:`hostile`, driven through the small :class:`Draw`
interface either by hypothesis (this file: deterministic, ``derandomize=True``, no example
database) or by a seeded random generator (``tests/benchmarks/bench_fuzz.py``: 1e5 cases).
Each one says what the consumer must do with it (:attr:`Hostile.expect`): ``"refuse"``,
``"harmless"`` (refused, or accepted without changing the result), or ``"any"`` (bit flips
and truncations of real messages can decode into other valid data, so only "no crash" and
"a refused message leaves no trace" are checked for them).

Not generated, because nothing in them tells them from real data: a proton charge of at
most 1e6 uC inside a counting step, omega logs under omega segmentation, a run stop under
omega segmentation, an Event document with a plausible window (also for an unknown
descriptor: the 0MQ source deliberately goes on after lost descriptors).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import tempfile
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from streaming_data_types.eventdata_ev44 import deserialise_ev44, serialise_ev44
from streaming_data_types.logdata_f144 import serialise_f144
from streaming_data_types.run_start_pl72 import deserialise_pl72, serialise_pl72
from streaming_data_types.run_stop_6s4t import serialise_6s4t

from consumers.messages import SourceMessage
from consumers.reduction.pipeline import MalformedMessage, RunPipeline, schema_of
from consumers.service import ConsumerService
from tests.fakes import ListSource

T = TypeVar("T")

I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
#: pulse times at or beyond this are outside any run (2**62 ns is the year 2116)
FAR_FUTURE = 2**62
SCHEMAS = ("ev44", "f144", "pl72", "6s4t", "bluesky-json")
TOPIC_OF = {
    "ev44": "events",
    "f144": "motion",
    "pl72": "runInfo",
    "6s4t": "runInfo",
    "bluesky": "bluesky",
}
OTHER_RUN_KEY = b"another-run"

# -- drawing ----------------------------------------------------------------------------------


class Draw(Protocol):
    """Where the fuzzer's choices come from (hypothesis, or a seeded generator)."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        ...

    def real(self) -> float:
        """Any float64, NaN and infinities included."""
        ...

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options``."""
        ...

    def blob(self, max_size: int) -> bytes:
        """Bytes, at most ``max_size``."""
        ...

    def text(self, max_size: int) -> str:
        """A string (encodable as UTF-8), at most ``max_size`` characters."""
        ...

    def ints(self, n: int, lo: int, hi: int) -> np.ndarray:
        """(n,) int64 in [lo, hi]."""
        ...


class HypothesisDraw:
    """:class:`Draw` over a hypothesis ``st.data()`` object (shrinks)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def real(self) -> float:
        return self.data.draw(st.floats())

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def blob(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        return self.data.draw(st.text(max_size=max_size))

    def ints(self, n: int, lo: int, hi: int) -> np.ndarray:
        return self.data.draw(npst.arrays(np.int64, n, elements=st.integers(lo, hi)))


_SPECIAL_FLOATS = (
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e6,
    -1.0,
    1.0,
)


class RandomDraw:
    """:class:`Draw` from a seeded generator; integers and floats lean towards the edges."""

    def __init__(self, seed: int) -> None:
        self.py = random.Random(seed)
        self.np = np.random.default_rng(seed)

    def integer(self, lo: int, hi: int) -> int:
        r = self.py.random()
        if r < 0.1:
            return lo
        if r < 0.2:
            return hi
        if r < 0.3 and lo <= 0 <= hi:
            return self.py.randint(max(lo, -8), min(hi, 8))
        return self.py.randint(lo, hi)

    def real(self) -> float:
        r = self.py.random()
        if r < 0.4:
            return self.py.choice(_SPECIAL_FLOATS)
        if r < 0.7:
            return float(np.frombuffer(self.py.randbytes(8), dtype=np.float64)[0])
        return self.py.uniform(-1e3, 1e3) * 10.0 ** self.py.randint(-10, 300)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.py.randrange(len(options))]

    def blob(self, max_size: int) -> bytes:
        return self.py.randbytes(self.integer(0, max_size))

    def text(self, max_size: int) -> str:
        n = self.integer(0, max_size)
        # any code point but the surrogates (which UTF-8 cannot encode)
        cps = self.np.integers(0, 0x110000 - 0x800, n)
        return "".join(chr(int(c) + (0x800 if c >= 0xD800 else 0)) for c in cps)

    def ints(self, n: int, lo: int, hi: int) -> np.ndarray:
        out = self.np.integers(lo, hi, n, dtype=np.int64, endpoint=True)
        edges = self.np.random(n)
        out[edges < 0.05] = lo
        out[(edges >= 0.05) & (edges < 0.1)] = hi
        return out


# -- hostile messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What the fuzzer knows about the run it attacks."""

    run_key: bytes
    start_ns: int  # first pulse of the run
    stop_ns: int  # last pulse of the run
    pixel_lo: int  # detector ids are [pixel_lo, pixel_hi]
    pixel_hi: int
    metadata: dict[str, Any]  # the run start's metadata
    descriptor: str  # the bluesky descriptor uid of the run
    samples: dict[str, tuple[tuple[tuple[str, bytes], ...], bytes]]  # real messages
    mode: str = "bluesky"
    started: bool = True  # the run start has been seen (a valid pl72 would be a second one)
    # the run's bluesky Event messages (headers, payload) already consumed, and the others
    announced: tuple[tuple[tuple[tuple[str, bytes], ...], bytes], ...] = ()
    upcoming: tuple[tuple[tuple[tuple[str, bytes], ...], bytes], ...] = ()
    # every Event message of the run with its position in it
    events: tuple[tuple[int, tuple[tuple[tuple[str, bytes], ...], bytes]], ...] = ()

    def at(self, position: int) -> Ctx:
        """The context of a message inserted before the run's message ``position``."""
        return replace(
            self,
            started=position > 0,
            announced=tuple(e for i, e in self.events if i < position),
            upcoming=tuple(e for i, e in self.events if i >= position),
        )


@dataclass(frozen=True)
class Hostile:
    """One hostile message and what the consumer must do with it."""

    kind: str  # "<family>/<what>"
    headers: tuple[tuple[str, bytes], ...]
    payload: bytes
    expect: str  # "refuse", "harmless" or "any"
    topic_suffix: str = ""

    @property
    def family(self) -> str:
        return self.kind.split("/", 1)[0]


def _fb_headers(d: Draw, schema: str) -> tuple[tuple[str, bytes], ...]:
    """The schema header, or none (the consumer then reads the file identifier)."""
    return d.choice(((("schema", schema.encode()),), ()))


def _time(d: Draw, ctx: Ctx) -> int:
    """A timestamp (ns): the run's, the edges of int64, or anything."""
    how = d.choice(("run", "edge", "any"))
    if how == "run":
        return d.integer(ctx.start_ns, ctx.stop_ns)
    if how == "edge":
        return d.choice((I64[0], -1, 0, 1, FAR_FUTURE, I64[1]))
    return d.integer(*I64)


def _name(d: Draw) -> str:
    """A source name: empty, giant, or any text."""
    how = d.choice(("text", "empty", "giant"))
    if how == "giant":
        return d.choice(("x", "é", "\U0001f9ea")) * d.choice((1000, 70_000))
    return "" if how == "empty" else d.text(24)


def _pulses(d: Draw, n: int) -> np.ndarray:
    """Valid start indices (first 0, non-decreasing, at most n) of at least one pulse."""
    p = d.integer(1, 6)
    idx = np.sort(d.ints(p, 0, n))
    idx[0] = 0
    return idx


def _ev44(d: Draw, ctx: Ctx) -> Hostile:
    kind = d.choice(
        (
            "pixel_tof_mismatch",
            "pulse_index_mismatch",
            "first_index_not_zero",
            "index_beyond_events",
            "index_decreasing",
            "events_without_pulses",
            "empty",
            "unknown_pixels",
            "before_run_start",
            "far_future",
            "negative_tof",
        )
    )
    n = d.integer(1, 40)
    tof = d.ints(n, *I32)
    pixel = d.ints(n, ctx.pixel_lo, ctx.pixel_hi)
    index = _pulses(d, n)
    times = np.sort(d.ints(len(index), ctx.start_ns, ctx.stop_ns))
    expect = "refuse"
    if kind == "pixel_tof_mismatch":
        pixel = d.ints(d.choice((n - 1, n + 1, n + d.integer(2, 9), 0)), *I32)
    elif kind == "pulse_index_mismatch":
        times = d.ints(len(index) + d.choice((-1, 1, 3)), *I64)
    elif kind == "first_index_not_zero":
        index[0] = d.choice((d.integer(1, n), d.integer(I32[0], -1)))
    elif kind == "index_beyond_events":
        index[d.integer(0, len(index) - 1)] = d.integer(n + 1, I32[1])
    elif kind == "index_decreasing":
        index = np.append(index, index[-1] - d.integer(1, 2**20))
        times = np.append(times, times[-1])
    elif kind == "events_without_pulses":
        index = times = np.zeros(0, np.int64)
    elif kind == "empty":
        tof = pixel = index = times = np.zeros(0, np.int64)
        expect = "harmless"
    elif kind == "unknown_pixels":
        below = d.ints(n, I32[0], ctx.pixel_lo - 1)
        above = d.ints(n, ctx.pixel_hi + 1, I32[1])
        pixel = np.where(d.ints(n, 0, 1) > 0, below, above)
        times = np.sort(d.ints(len(index), *I64))
        expect = "harmless"
    elif kind == "before_run_start":
        pixel = d.ints(n, *I32)
        times = np.sort(d.ints(len(index), I64[0], ctx.start_ns - 1))
        expect = "harmless"
    elif kind == "far_future":
        pixel = d.ints(n, *I32)
        times = np.sort(d.ints(len(index), FAR_FUTURE, I64[1]))
        expect = "harmless"
    elif kind == "negative_tof":
        tof = d.ints(n, I32[0], 0)
        expect = "harmless"
    payload = serialise_ev44(_name(d), d.integer(*I64), times, index, tof, pixel)
    return Hostile(f"ev44/{kind}", _fb_headers(d, "ev44"), bytes(payload), expect)


_F144_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)


def _f144_value(d: Draw, lo: float, hi: float) -> Any:
    """A finite scalar in [lo, hi] as a Python float or int, or a numpy scalar."""
    how = d.choice(("float", "float32", "int"))
    if how == "int":
        t: Any = d.choice(_F144_DTYPES)
        info = np.iinfo(t)
        a, b = max(int(info.min), math.ceil(lo)), min(int(info.max), math.floor(hi))
        if a <= b:
            return t(d.integer(a, b))
    x = d.real()
    if not math.isfinite(x) or not lo <= x <= hi:
        x = lo + (hi - lo) * d.integer(0, 1000) / 1000
    with np.errstate(over="ignore"):
        x32 = np.float32(x)
    if how == "float32" and lo <= float(x32) <= hi:
        return x32
    return float(x)


def _f144(d: Draw, ctx: Ctx) -> Hostile:
    kinds = [
        "non_finite",
        "negative_charge",
        "huge_charge",
        "charge_before_run_start",
        "other_source",
        "array_value",
    ]
    if ctx.mode == "bluesky":
        kinds.append("omega_in_bluesky_mode")
    kind = d.choice(kinds)
    source = d.choice(("proton_charge", "omega", "omega_setpoint"))
    t = _time(d, ctx)
    expect = "refuse"
    value: Any
    if kind == "non_finite":
        value = d.choice((math.nan, math.inf, -math.inf, np.float32("nan"), np.float32("-inf")))
        source = d.choice((source, _name(d)))
    elif kind == "negative_charge":
        source, value = "proton_charge", _f144_value(d, -1.7976931348623157e308, -5e-324)
    elif kind == "huge_charge":
        # above any pulse's charge (ESS: ~4 uC, SNS: ~23 uC); sums of them overflow
        source, value = "proton_charge", _f144_value(d, 1.01e6, 1.7976931348623157e308)
    elif kind == "charge_before_run_start":
        source, value = "proton_charge", _f144_value(d, 0.0, 1e6)
        t = d.integer(I64[0], ctx.start_ns - 1)
        expect = "harmless"
    elif kind == "other_source":
        source = _name(d)
        if source in ("proton_charge", "omega", "omega_setpoint"):
            source += "_"
        value = _f144_value(d, -1.7976931348623157e308, 1.7976931348623157e308)
        expect = "harmless"
    elif kind == "array_value":
        value = np.asarray(d.ints(d.integer(2, 6), *I32), dtype=d.choice((np.float64, np.int32)))
        source = d.choice((source, _name(d)))
    else:  # omega logs do not segment a bluesky-mode run
        # (an omega log: a proton charge in the run's time would be real data, not harmless)
        source = "omega" if source == "proton_charge" else source
        value = _f144_value(d, -1.7976931348623157e308, 1.7976931348623157e308)
        expect = "harmless"
    if source not in ("proton_charge", "omega", "omega_setpoint"):
        # a log the run's streams do not map is counted and skipped whatever its value (a
        # facility's motion topic carries many; a disconnected one reads NaN)
        expect = "harmless"
    payload = serialise_f144(source, value, t)
    return Hostile(f"f144/{kind}", _fb_headers(d, "f144"), bytes(payload), expect)


def _garbage_json(d: Draw, depth: int = 0) -> Any:
    """Nested JSON-ready garbage."""
    how = d.choice(("int", "float", "text", "null", "bool", "list", "dict", "deep"))
    if how == "int":
        return d.choice((d.integer(*I64), 10**30, -(10**30)))
    if how == "float":
        return d.real()
    if how == "text":
        return d.text(12)
    if how == "null":
        return None
    if how == "bool":
        return d.choice((True, False))
    if how == "deep":
        n = d.choice((50, 5000))
        return json.loads("[" * n + "]" * n) if n < 900 else {"deep": "[" * n + "]" * n}
    if depth > 2:
        return []
    items = [_garbage_json(d, depth + 1) for _ in range(d.integer(0, 3))]
    if how == "list":
        return items
    return {d.text(6): v for v in items}


def _bad_metadata(d: Draw, ctx: Ctx) -> tuple[str, str]:
    """(what, metadata text) of a run start that cannot be used."""
    meta = copy.deepcopy(ctx.metadata)
    what = d.choice(("not_json", "not_object", "missing_key", "bad_value", "deep"))
    if what == "not_json":
        return what, d.choice(("", "{", "{'material': 'Ge'}", "NaN]", d.text(40) + "{"))
    if what == "not_object":
        return what, json.dumps(d.choice(([meta], "Ge", 45.0, None, [])))
    if what == "deep":
        n = d.choice((1000, 100_000))
        return what, '{"material": ' + "[" * n + "]" * n + "}"
    key = d.choice(("material", "instrument", "orientation", "ei_meV"))
    if what == "missing_key":
        del meta[key]
        return f"missing_{key}", json.dumps(meta)
    bad: Any
    if key == "material":
        bad = d.choice((None, 42, [], {"nested": [1, {}]}, "Xx", "Ge" * 50_000, d.text(8) + "!"))
    elif key == "instrument":
        bad = d.choice((None, "arcs", [], {}, {"name": []}, _garbage_json(d)))
        if isinstance(bad, dict) and "name" not in bad and bad:
            bad = {"nonsense": bad}
    elif key == "orientation":
        u = meta["orientation"]["u"]
        bad = d.choice(
            (
                None,
                "u",
                {},
                {"u": u},
                {"u": [0, 0, 0], "v": u},
                {"u": u, "v": u},
                {"u": [math.nan, 0, 0], "v": meta["orientation"]["v"]},
                {"u": ["a", "b", "c"], "v": meta["orientation"]["v"]},
            )
        )
    else:
        bad = d.choice(
            (math.nan, math.inf, -math.inf, 0, -1.0, -1e300, None, "fast", [45.0], {"ei": 45})
        )
    meta[key] = bad
    return f"bad_{key}", json.dumps(meta)


def _pl72(d: Draw, ctx: Ctx) -> Hostile:
    if ctx.started and d.choice((False, True)):
        meta = dict(ctx.metadata, run_id=d.choice((ctx.metadata.get("run_id", ""), d.text(8))))
        what, text = "second_valid", json.dumps(meta)
    else:
        what, text = _bad_metadata(d, ctx)
    payload = serialise_pl72(
        job_id=_name(d),
        filename=d.text(10),
        start_time=d.integer(0, 2**62),
        run_name=_name(d),
        instrument_name=d.text(6),
        metadata=text,
    )
    return Hostile(f"pl72/{what}", _fb_headers(d, "pl72"), bytes(payload), "refuse")


def _6s4t(d: Draw, ctx: Ctx) -> Hostile:
    kind = d.choice(("garbage", "wrong_identifier", "valid"))
    headers: tuple[tuple[str, bytes], ...] = (("schema", b"6s4t"),)
    if kind == "garbage":
        payload = d.choice((b"", d.blob(64), b"\x00" * 8 + b"6s4t"))
    else:
        payload = bytes(
            serialise_6s4t(job_id=_name(d), run_name=d.text(8), stop_time=d.integer(0, 2**63 - 1))
        )
        if kind == "wrong_identifier":
            ident = d.choice((b"6s4u", b"\x00\x00\x00\x00", b"ev44", b"pl72"))
            payload = payload[:4] + ident + payload[8:]
        else:
            headers = _fb_headers(d, "6s4t")
    # a run stop that is not this run's last word: harmless only where stops do not segment
    expect = "refuse" if kind != "valid" else "harmless" if ctx.mode == "bluesky" else "any"
    return Hostile(f"6s4t/{kind}", headers, payload, expect)


def _bluesky_event_doc(d: Draw, ctx: Ctx) -> tuple[str, Any]:
    """An Event document whose data cannot give a counting window."""
    lo = d.integer(ctx.start_ns, ctx.stop_ns)
    data: dict[str, Any] = {
        "omega": float(d.integer(-180, 180)),
        "count_start_ns": lo,
        "count_stop_ns": lo + d.integer(1, 10**10),
    }
    what = d.choice(
        (
            "no_data",
            "data_not_object",
            "missing_field",
            "non_numeric",
            "non_finite_omega",
            "empty_window",
            "beyond_int64",
        )
    )
    doc: dict[str, Any] = {
        "uid": d.text(8),
        "descriptor": d.choice((ctx.descriptor, d.text(8))),
        "seq_num": d.integer(*I64),
        "time": d.real(),
        "timestamps": {},
    }
    if what == "no_data":
        pass
    elif what == "data_not_object":
        doc["data"] = d.choice(([data], "data", None, 3))
    else:
        key = d.choice(("omega", "count_start_ns", "count_stop_ns"))
        if what == "missing_field":
            del data[key]
        elif what == "non_numeric":
            data[key] = d.choice((None, [], {}, "x" + d.text(5), [1, 2]))
        elif what == "non_finite_omega":
            data["omega"] = d.choice((math.nan, math.inf, -math.inf))
        elif what == "empty_window":
            data["count_stop_ns"] = lo - d.integer(0, 10**12)
        else:  # no pulse time is outside int64
            edge = d.choice((2**63, 10**30, -(2**63) - 1, -(10**30)))
            data[d.choice(("count_start_ns", "count_stop_ns"))] = edge
            if data["count_stop_ns"] <= data["count_start_ns"]:
                data["count_stop_ns"] = max(data["count_start_ns"] + 1, 2**63)
        doc["data"] = data
    return f"event_{what}", doc


def _bluesky(d: Draw, ctx: Ctx) -> Hostile:
    kind = d.choice(("not_json", "not_a_pair", "event", "other_document", "repeated"))
    expect = "refuse"
    name = "event"
    if kind == "repeated":  # a real document once more (a producer's retry)
        what = d.choice(("event", "other"))
        if what == "event" and (ctx.announced or ctx.upcoming):
            if ctx.announced and (not ctx.upcoming or d.choice((False, True))):
                headers, raw = d.choice(ctx.announced)
                expect = "refuse" if ctx.mode == "bluesky" else "harmless"
                return Hostile("bluesky/repeated_event", headers, raw, expect)
            # an Event before its time: its step's window comes out of order
            headers, raw = d.choice(ctx.upcoming)
            return Hostile("bluesky/early_event", headers, raw, "any")
        real = d.choice(("bluesky/start", "bluesky/descriptor", "bluesky/stop"))
        headers, raw = ctx.samples[real]
        return Hostile("bluesky/repeated_" + real.split("/")[1], headers, raw, "harmless")
    if kind == "not_json":
        raw = d.choice((b"", b"[", b'["event", {]', b"\xff\xfe", d.blob(40) + b"\x00"))
    elif kind == "not_a_pair":
        value: Any = d.choice(
            ("ev", [1, 2], ["event"], ["event", {}, {}], {"event": {}, "x": 1}, None, 3.5)
        )
        if d.choice((False, True)):
            value = [_garbage_json(d), _garbage_json(d)]
            if isinstance(value[0], str) and isinstance(value[1], dict):
                value[1] = [value[1]]
        raw = json.dumps(value).encode()
    elif kind == "event":
        what, doc = _bluesky_event_doc(d, ctx)
        kind = what
        raw = json.dumps(["event", doc]).encode()
        if ctx.mode != "bluesky":  # Event documents do not segment this run
            expect = "harmless"
    else:  # documents that do not segment anything: garbage inside is ignored
        name = d.choice(("start", "descriptor", "stop", "resource", "datum", "event_page"))
        doc = {d.text(6): _garbage_json(d) for _ in range(d.integer(0, 3))}
        raw = json.dumps([name, doc]).encode()
        expect = "harmless"
    document = d.choice((name.encode(), b"start", b"", d.text(6).encode()))
    headers = d.choice(
        (
            (("schema", b"bluesky-json"), ("document", document)),
            (("schema", b"bluesky-json"),),
        )
    )
    return Hostile(f"bluesky/{kind}", headers, raw, expect)


def _raw(d: Draw, ctx: Ctx) -> Hostile:
    kind = d.choice(
        ("random_bytes", "unknown_schema", "wrong_identifier", "truncated", "bit_flips", "empty")
    )
    real = d.choice(sorted(ctx.samples))
    headers, payload = ctx.samples[real]
    expect = "any"
    topic = TOPIC_OF.get(real.split("/")[0], "motion")
    if kind == "random_bytes":
        payload = d.choice((d.blob(256), d.blob(8) + b"\x00" * 70_000))
        headers = d.choice(((), (("schema", d.choice(SCHEMAS).encode()),)))
        expect = "harmless"
    elif kind == "unknown_schema":
        unknown = d.choice((b"ev42", b"f142", b"", b"\xff\xfe", b"EV44", b"bluesky", b"x" * 300))
        headers = (("schema", unknown),)
        payload = d.choice((payload, d.blob(64)))
        expect = "refuse"
    elif kind == "wrong_identifier":
        schema = real.split("/")[0]
        if schema in ("ev44", "f144", "pl72", "6s4t"):
            ident = d.choice(
                tuple(
                    s
                    for s in (b"ev44", b"f144", b"pl72", b"6s4t", b"ev42", b"\x00" * 4)
                    if s != schema.encode()
                )
            )
            payload = payload[:4] + ident + payload[8:]
            headers = (("schema", schema.encode()),)
        else:  # a real flatbuffer under the bluesky schema
            payload = ctx.samples["f144/proton_charge"][1]
        expect = "refuse"
    elif kind == "truncated":
        payload = payload[: d.integer(0, max(0, len(payload) - 1))]
    elif kind == "bit_flips":
        buf = bytearray(payload)
        for _ in range(d.integer(1, 8)):
            i = d.integer(0, len(buf) - 1)
            buf[i] ^= 1 << d.integer(0, 7)
        payload = bytes(buf)
    else:
        payload = b""
        headers = d.choice(((), (("schema", d.choice(SCHEMAS).encode()),)))
        expect = "refuse"
    return Hostile(f"raw/{kind}:{real}", tuple(headers), bytes(payload), expect, topic)


_FAMILIES = {
    "ev44": _ev44,
    "f144": _f144,
    "pl72": _pl72,
    "6s4t": _6s4t,
    "bluesky": _bluesky,
    "raw": _raw,
}


def hostile(d: Draw, ctx: Ctx) -> Hostile:
    """One hostile message for the run described by ``ctx``."""
    h = _FAMILIES[d.choice(tuple(_FAMILIES))](d, ctx)
    if not h.topic_suffix:
        h = replace(h, topic_suffix=TOPIC_OF[h.family])
    return h


# -- the run under attack ---------------------------------------------------------------------


def run_context(msgs: Sequence[Any], mode: str = "bluesky") -> Ctx:
    """:class:`Ctx` of a recorded run (``msgs`` with topic, key, headers and payload)."""
    pl72 = next(m for m in msgs if dict(m.headers).get("schema") == b"pl72")
    meta = json.loads(deserialise_pl72(pl72.payload).metadata)
    samples: dict[str, tuple[tuple[tuple[str, bytes], ...], bytes]] = {}
    descriptor = ""
    times = []
    events = []
    for i, m in enumerate(msgs):
        h = dict(m.headers)
        if h.get("document") == b"event":
            events.append((i, (tuple(m.headers), bytes(m.payload))))
        schema = h.get("schema", b"").decode()
        if schema == "ev44":
            times.append(m.timestamp_ns)
        what = schema
        if schema == "f144":
            from consumers.wire import decode_f144

            what += "/" + decode_f144(m.payload)[0]
        elif schema == "bluesky-json":
            what = "bluesky/" + h.get("document", b"").decode()
            if what == "bluesky/descriptor":
                descriptor = json.loads(m.payload)[1]["uid"]
        elif schema == "ev44" and what not in samples:  # its first 30 events: cheap to mutate
            ev = deserialise_ev44(m.payload)
            n = min(30, len(ev.time_of_flight))
            small = serialise_ev44(
                ev.source_name, ev.message_id, ev.reference_time[:1], [0],
                ev.time_of_flight[:n], ev.pixel_id[:n],
            )  # fmt: skip
            samples[what] = (tuple(m.headers), bytes(small))
        samples.setdefault(what, (tuple(m.headers), bytes(m.payload)))
    from simulations.instrument.spectrometer import Instrument

    ids = Instrument.from_metadata(meta["instrument"]).pixel_ids
    return Ctx(
        run_key=pl72.key or b"",
        start_ns=min(times),
        stop_ns=max(times),
        pixel_lo=int(ids.min()),
        pixel_hi=int(ids.max()),
        metadata=meta,
        descriptor=descriptor,
        samples=samples,
        mode=mode,
        events=tuple(events),
    )


def clone(pipe: RunPipeline) -> RunPipeline:
    """A copy of a (synchronous) pipeline that shares its immutable fold machinery."""
    assert not pipe.in_flight
    assert not pipe.background
    memo: dict[int, Any] = {id(pipe.meta): pipe.meta}  # never changed in place
    # the run start's set-up and the stream roles are immutable machinery too
    memo[id(pipe.streams)] = pipe.streams
    if pipe.nexus is not None:
        memo[id(pipe.nexus)] = pipe.nexus
    if pipe.folder is not None:
        memo[id(pipe.folder)] = pipe.folder
        memo[id(pipe.folder.grid)] = pipe.folder.grid
    # the moments' structure constants (with their cache's lock) are shared machinery too
    if pipe._constants is not None:
        memo[id(pipe._constants)] = pipe._constants
    return copy.deepcopy(pipe, memo)


_SKIP = frozenset({"folder", "_pool", "fold_seconds", "snapshots", "closed_at", "_closed", "grid"})
_BY_IDENTITY = frozenset({"meta"})  # replaced, never changed in place


def fingerprint(obj: Any, depth: int = 0) -> Any:
    """A cheap, comparable picture of an object's state: scalars as they are, containers
    element by element, arrays by identity, shape and sum (not deep: event buffers are
    lists of per-message arrays, so a new message shows as a new element)."""
    if obj is None or isinstance(obj, bool | int | str | bytes):
        return obj
    if isinstance(obj, float | np.generic):
        return repr(obj)
    if isinstance(obj, np.ndarray):
        total = repr(obj.sum()) if obj.size < 50_000 else None
        return ("array", obj.shape, obj.dtype.str, id(obj), total)
    if depth > 6:
        return type(obj).__name__
    if isinstance(obj, dict):
        return tuple((repr(k), fingerprint(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, list | tuple | set | frozenset | deque):
        try:  # fast for long lists of numbers (pulse charges)
            return (type(obj).__name__, len(obj), hash(tuple(obj)))
        except TypeError:
            return (type(obj).__name__, tuple(fingerprint(v, depth + 1) for v in obj))
    names = set(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        names.update(getattr(klass, "__slots__", ()))
    out = []
    for name in sorted(names - _SKIP):
        value = getattr(obj, name, None)
        out.append((name, id(value) if name in _BY_IDENTITY else fingerprint(value, depth + 1)))
    return (type(obj).__name__, tuple(out))


@dataclass
class Result:
    """What a finished run gave."""

    counts: np.ndarray
    exposure: np.ndarray
    orientations: int
    omegas: list[float]
    events_folded: int
    events_dropped: int
    n_events: int

    @classmethod
    def of(cls, pipe: RunPipeline) -> Result:
        s = pipe.summary()
        acc = pipe.acc
        return cls(
            counts=np.array(acc.counts) if acc is not None else np.zeros(0),
            exposure=np.array(acc.exposure) if acc is not None else np.zeros(0),
            orientations=int(s["orientations"]),  # type: ignore[call-overload]
            omegas=[r.omega for r in acc.records] if acc is not None else [],
            events_folded=int(s["events_folded"]),  # type: ignore[call-overload]
            events_dropped=int(s["events_dropped"]),  # type: ignore[call-overload]
            n_events=pipe.n_events,
        )

    def check_same_as(self, clean: Result) -> None:
        """The same spectrum as the clean run; extra events only as dropped ones."""
        np.testing.assert_array_equal(self.counts, clean.counts)
        np.testing.assert_array_equal(self.exposure, clean.exposure)
        assert self.orientations == clean.orientations
        assert self.omegas == clean.omegas
        assert self.events_folded == clean.events_folded
        assert self.events_dropped - clean.events_dropped == self.n_events - clean.n_events

    def check_accounted(self) -> None:
        """Every event received was folded or dropped (under a reason)."""
        assert self.events_folded + self.events_dropped == self.n_events


@dataclass
class Cut:
    """A pipeline stopped at one point of the clean run, and the clean run's result from
    there (finished without anything more)."""

    name: str
    pipe: RunPipeline
    ctx: Ctx
    clean: Result


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory, make_small_run: Any) -> Any:
    """A short simulated Ge run (3 orientations), its messages and its offline fold."""
    from simulations.runs.recording import RunReader

    path = tmp_path_factory.mktemp("fuzz") / "ge.steer"
    path, summary, acc = make_small_run(path, (0.0, 20.0, 40.0), seed=5)
    with RunReader(path) as reader:
        msgs = list(reader)
    return msgs, summary, acc


def _feed(pipe: RunPipeline, msgs: Sequence[Any]) -> None:
    for m in msgs:
        pipe.handle(schema_of(m.headers, m.payload), m.payload, m.timestamp_ns, m.key)


def make_cuts(msgs: Sequence[Any]) -> dict[str, Cut]:
    """The pipelines the per-message fuzzing starts from: before the run start, just after
    it, mid-run (one orientation done, the goniometer moving), after the whole run, and
    mid-run in omega segmentation."""
    cuts: dict[str, Cut] = {}
    ctx = run_context(msgs)
    # refused messages leave no trace (checked), so the run start that follows opens the
    # run as it would have (see test_a_bad_run_start_does_not_lose_the_run)
    cuts["before_run_start"] = Cut(
        "before_run_start",
        RunPipeline(background=False),
        ctx.at(0),
        Result.of(RunPipeline(background=False)),
    )
    for mode in ("bluesky", "omega"):
        pipe = RunPipeline(mode=mode, background=False)
        _feed(pipe, msgs[:5])
        if mode == "bluesky":
            cuts["run_started"] = _cut("run_started", pipe, ctx.at(5))
        pos = 5
        while pipe.acc is not None and not pipe.acc.records:
            _feed(pipe, msgs[pos : pos + 1])
            pos += 1
        _feed(pipe, msgs[pos : pos + 60])
        assert pipe.segmenter is not None
        assert pipe.segmenter.pending_windows == 0
        mid = replace(ctx.at(pos + 60), mode=mode)
        cuts[f"mid_run_{mode}"] = _cut(f"mid_run_{mode}", pipe, mid)
    pipe = RunPipeline(background=False)
    _feed(pipe, msgs)
    pipe.finish()
    cuts["run_finished"] = _cut("run_finished", pipe, ctx.at(len(msgs)))
    return cuts


def _cut(name: str, pipe: RunPipeline, ctx: Ctx) -> Cut:
    done = clone(pipe)
    done.finish()
    return Cut(name, clone(pipe), ctx, Result.of(done))


@pytest.fixture(scope="module")
def cuts(fuzz_run: Any) -> dict[str, Cut]:
    return make_cuts(fuzz_run[0])


def key_for(d: Draw, ctx: Ctx) -> bytes | None:
    """The message key: this run's, none, or another run's."""
    return d.choice((ctx.run_key, ctx.run_key, None, OTHER_RUN_KEY))


@dataclass
class Tally:
    """Cases fed and what came of them."""

    cases: int = 0
    accepted: int = 0
    by_schema: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)


def attack_pipeline(
    cut: Cut, attack: Sequence[tuple[Hostile, bytes | None, int]], tally: Tally | None = None
) -> None:
    """Feed hostile messages to a copy of ``cut``'s pipeline and check every property."""
    tally = tally if tally is not None else Tally()
    pipe = clone(cut.pipe) if cut.pipe.meta is not None else RunPipeline(background=False)
    unsure = False  # a message that may carry other valid data was accepted
    for h, key, ts in attack:
        schema = schema_of(h.headers, h.payload)
        tally.cases += 1
        tally.by_schema[schema] += 1
        tally.by_kind[h.kind.split(":")[0]] += 1
        before = fingerprint(pipe)
        reason: str | None = None
        try:
            pipe.handle(schema, h.payload, ts, key)
        except MalformedMessage as exc:
            reason = exc.reason
        if reason is not None:
            assert isinstance(reason, str)
            assert reason, h.kind
            tally.by_reason[reason] += 1
            assert fingerprint(pipe) == before, f"{h.kind} refused ({reason}) left a trace"
            continue
        tally.accepted += 1
        must_refuse = h.expect == "refuse" or (
            key == OTHER_RUN_KEY and pipe.meta is not None and schema != "pl72"
        )
        # (after an accepted message that may carry other valid data, such as a bit-flipped
        # run start that opened a differently segmented run, expectations no longer hold)
        assert unsure or not must_refuse, f"{h.kind} ({schema}, key {key!r}) was accepted"
        unsure |= h.expect == "any"
    pipe.finish()
    result = Result.of(pipe)
    result.check_accounted()
    if not unsure:
        result.check_same_as(cut.clean)


_FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(_FUZZ, max_examples=1200)
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN orientation vectors and such
def test_hostile_messages_never_change_the_pipeline_s_result(
    cuts: dict[str, Cut], data: st.DataObject
) -> None:
    """Per message, at five points of a run: refused ones leave no trace, invalid ones are
    refused, and the run finishes with the clean result."""
    cut = cuts[data.draw(st.sampled_from(sorted(cuts)))]
    d = HypothesisDraw(data)
    attack = []
    for _ in range(d.integer(1, 6)):
        h = hostile(d, cut.ctx)
        attack.append((h, key_for(d, cut.ctx), _time(d, cut.ctx)))
    attack_pipeline(cut, attack)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_fuzzer_reaches_every_kind_and_reason(cuts: dict[str, Cut]) -> None:
    """The seeded generator of the benchmark, on the same properties: every kind of hostile
    message comes up, and is refused under every reason the pipeline has."""
    d = RandomDraw(8)
    tally = Tally()
    names = sorted(cuts)
    while tally.cases < 1500:
        cut = cuts[d.choice(names)]
        attack = [
            (hostile(d, cut.ctx), key_for(d, cut.ctx), _time(d, cut.ctx))
            for _ in range(d.integer(1, 12))
        ]
        attack_pipeline(cut, attack, tally)
    assert len(tally.by_kind) >= 50, sorted(tally.by_kind)
    assert set(tally.by_reason) == {
        "before_run_start", "other_run", "unknown_schema", "second_run_start",
        "malformed_pl72", "malformed_ev44", "malformed_f144", "malformed_6s4t",
        "malformed_bluesky-json", "non_finite", "negative_charge", "huge_charge",
    }  # fmt: skip
    assert set(tally.by_schema) >= {"ev44", "f144", "pl72", "6s4t", "bluesky-json", "unknown"}


# -- the live consumer --------------------------------------------------------------------------


def interleave(
    clean: Sequence[Any], inserts: Sequence[tuple[int, Hostile, bytes | None, int, int]]
) -> tuple[list[SourceMessage], set[tuple[str, int, int]], set[tuple[str, int, int]]]:
    """The clean run with hostile messages inserted (position, message, key, partition,
    copies: a message delivered twice keeps its offset), offsets in order per partition.

    Returns the messages and the positions of the hostile ones that must be refused and of
    the ones that may carry other valid data.
    """
    prefix = clean[0].topic.rsplit("_", 1)[0]
    at: dict[int, list[tuple[Hostile, bytes | None, int, int]]] = {}
    for pos, h, key, part, copies in inserts:
        at.setdefault(pos, []).append((h, key, part, copies))
    offsets: Counter[tuple[str, int]] = Counter()
    out: list[SourceMessage] = []
    refuse: set[tuple[str, int, int]] = set()
    unsure: set[tuple[str, int, int]] = set()

    def add(
        topic: str, part: int, key: bytes | None, ts: int, headers: Any, payload: bytes
    ) -> SourceMessage:
        off = offsets[(topic, part)]
        offsets[(topic, part)] += 1
        m = SourceMessage(
            topic=topic, partition=part, offset=off, key=key, timestamp_ns=ts,
            headers=tuple(headers), payload=payload,
        )  # fmt: skip
        out.append(m)
        return m

    for i in range(len(clean) + 1):
        for h, key, part, copies in at.get(i, []):
            ts = clean[min(i, len(clean) - 1)].timestamp_ns
            m = add(f"{prefix}_{h.topic_suffix}", part, key, ts, h.headers, h.payload)
            where = (m.topic, m.partition, m.offset)
            if h.expect == "refuse":
                refuse.add(where)
            elif h.expect == "any":
                unsure.add(where)
            out += [m] * (copies - 1)
        if i < len(clean):
            c = clean[i]
            add(c.topic, 0, c.key, c.timestamp_ns, c.headers, c.payload)
    return out, refuse, unsure


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def attack_service(
    msgs: list[SourceMessage],
    refuse: set[tuple[str, int, int]],
    unsure: set[tuple[str, int, int]],
    clean: Result,
    state_dir: Path,
    *,
    check_logs: bool = True,
) -> tuple[ConsumerService, list[tuple[SourceMessage, str]], bool]:
    """Run the live consumer over ``msgs`` and check every property; returns it, its dead
    letters and whether its result was compared with ``clean``."""
    letters: list[tuple[SourceMessage, str]] = []
    service = ConsumerService(
        ListSource(msgs), state_dir, dead_letter=lambda m, r: letters.append((m, r))
    )
    service.pipeline.background = False
    records = _Records()
    log = logging.getLogger("consumers")
    if check_logs:
        log.addHandler(records)
    try:
        for _ in range(len(msgs) + 10):  # nothing raises out of the consumer
            if service.done:
                break
            service.step(max_records=997)
    finally:
        log.removeHandler(records)
        # the moments are written on a thread after each checkpoint (``run`` waits for
        # them, a caller that steps does it itself): else the state folder may be removed
        # while a write is under way (a flaky "directory not empty" at its cleanup)
        service.flush_moments()
    assert service.done
    # every refused message is counted, under a reason, and dead-lettered once
    malformed = {
        k[len("malformed_") :]: v for k, v in service.counters.items() if k.startswith("malformed_")
    }
    assert Counter(r for _, r in letters) == Counter(malformed)
    assert all(isinstance(r, str) and r for _, r in letters)
    dead = [(m.topic, m.partition, m.offset) for m, _ in letters]
    assert len(dead) == len(set(dead))  # once (a re-delivered copy is a duplicate)
    if check_logs:  # ... and logged with where it came from
        for m, _ in letters:
            where = f"{m.topic}[{m.partition}]@{m.offset}"
            assert any(where in line for line in records.lines), where
    result = Result.of(service.pipeline)
    result.check_accounted()
    held = {(m.topic, m.partition, m.offset) for m in service._next + service._early}
    if unsure - set(dead) - held:
        return service, letters, False  # other valid data may have come in (a flipped run start)
    # the invalid ones are refused (or held for a next run that never came)
    missed = refuse - set(dead) - held
    assert not missed, f"accepted: {sorted(missed)[:5]}"
    result.check_same_as(clean)
    return service, letters, True


@pytest.fixture(scope="module")
def clean_result(fuzz_run: Any) -> Result:
    msgs, summary, acc = fuzz_run
    pipe = RunPipeline(background=False)
    _feed(pipe, msgs)
    pipe.finish()
    result = Result.of(pipe)
    np.testing.assert_array_equal(result.counts, acc.counts)  # the offline fold's
    assert result.events_folded == summary["events_folded"]
    assert result.events_dropped == summary["events_dropped"]
    return result


@settings(_FUZZ, max_examples=25)
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_hostile_messages_interleaved_into_a_live_run(
    fuzz_run: Any, clean_result: Result, data: st.DataObject
) -> None:
    """A whole run through the live consumer with hostile messages anywhere in it (also
    before the run start, on other partitions, keyed with another run, delivered twice)."""
    clean = fuzz_run[0]
    ctx = run_context(clean)
    d = HypothesisDraw(data)
    inserts = []
    for _ in range(d.integer(1, 40)):
        pos = d.integer(0, len(clean))
        h = hostile(d, ctx.at(pos))
        if pos == 0 and h.kind.startswith("pl72/second_valid"):
            continue
        inserts.append((pos, h, key_for(d, ctx), d.choice((0, 0, 0, 1)), d.choice((1, 1, 2))))
    msgs, refuse, unsure = interleave(clean, inserts)
    with tempfile.TemporaryDirectory() as tmp:
        attack_service(msgs, refuse, unsure, clean_result, Path(tmp))


# -- what the fuzzing found -----------------------------------------------------------------------


def _fold_with(
    msgs: Sequence[Any],
    inserts: dict[int, list[tuple[tuple[tuple[str, bytes], ...], bytes]]],
    mode: str = "auto",
    key: bytes | None = None,
) -> tuple[RunPipeline, list[str]]:
    """The run with (headers, payload) messages inserted before the given positions,
    folded by a synchronous pipeline; returns it and the reasons of the refused ones."""
    pipe = RunPipeline(mode=mode, background=False)
    reasons: list[str] = []
    for i in range(len(msgs) + 1):
        for headers, payload in inserts.get(i, []):
            ts = msgs[min(i, len(msgs) - 1)].timestamp_ns
            try:
                pipe.handle(schema_of(headers, payload), payload, ts, key)
            except MalformedMessage as exc:
                reasons.append(exc.reason)
        if i < len(msgs):
            _feed(pipe, msgs[i : i + 1])
    pipe.finish()
    return pipe, reasons


def _bluesky_events(msgs: Sequence[Any]) -> list[int]:
    return [i for i, m in enumerate(msgs) if dict(m.headers).get("document") == b"event"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ei_meV", None),  # missing
        ("ei_meV", math.nan),
        ("ei_meV", math.inf),
        ("orientation", {"u": [0.0, 0.0, 0.0], "v": [0.0, 1.0, 0.0]}),
        ("orientation", {"u": [math.nan, 0.0, 0.0], "v": [0.0, 1.0, 0.0]}),
    ],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_bad_run_start_does_not_lose_the_run(
    fuzz_run: Any, clean_result: Result, key: str, value: Any
) -> None:
    """A run start that failed half-way through the pipeline's setup kept its metadata: the
    real run start was then refused as a second one and every message after it as coming
    before the run start. An infinite Ei or a null/NaN orientation vector was taken."""
    msgs = fuzz_run[0]
    meta = copy.deepcopy(run_context(msgs).metadata)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    bad = bytes(serialise_pl72("bad", "bad.nxs", metadata=json.dumps(meta)))
    pipe, reasons = _fold_with(msgs, {0: [((("schema", b"pl72"),), bad)]})
    assert reasons == ["malformed_pl72"]
    Result.of(pipe).check_same_as(clean_result)


def test_a_bad_run_start_first_does_not_stop_the_live_consumer(
    fuzz_run: Any, clean_result: Result, tmp_path: Path
) -> None:
    msgs = fuzz_run[0]
    meta = dict(run_context(msgs).metadata)
    del meta["ei_meV"]
    bad = Hostile(
        "pl72/missing_ei_meV",
        (("schema", b"pl72"),),
        bytes(serialise_pl72("bad", "bad.nxs", metadata=json.dumps(meta))),
        "refuse",
        "runInfo",
    )
    stream, refuse, unsure = interleave(msgs, [(0, bad, msgs[0].key, 0, 1)])
    _, letters, compared = attack_service(stream, refuse, unsure, clean_result, tmp_path)
    assert compared
    assert [r for _, r in letters] == ["malformed_pl72"]


def test_a_run_stop_that_does_not_decode_is_refused(fuzz_run: Any) -> None:
    """Any payload under the 6s4t schema stopped the run; in omega segmentation it also
    closed the open step there."""
    msgs = fuzz_run[0]
    clean, _ = _fold_with(msgs, {}, mode="omega")
    real = next(m for m in msgs if dict(m.headers).get("schema") == b"6s4t").payload
    wrong_id = real[:4] + b"6s4u" + real[8:]
    at = len(msgs) // 2
    headers: tuple[tuple[str, bytes], ...] = (("schema", b"6s4t"),)
    inserts = {at: [(headers, b"stop!"), (headers, bytes(wrong_id))]}
    pipe, reasons = _fold_with(msgs, inserts, mode="omega")
    assert reasons == ["malformed_6s4t", "malformed_6s4t"]
    Result.of(pipe).check_same_as(Result.of(clean))


def test_huge_proton_charges_are_refused(fuzz_run: Any, clean_result: Result) -> None:
    """Two finite charges of 1e308 uC in one counting step summed to inf: the accumulator
    refused the orientation with a FoldError that left the pipeline (from the message that
    happened to close the step, or from ``finish``: the consumer stopped)."""
    msgs = fuzz_run[0]
    events = _bluesky_events(msgs)
    t = msgs[events[1]].timestamp_ns - 10**9  # inside the second step
    huge = bytes(serialise_f144("proton_charge", 1e308, t))
    pipe, reasons = _fold_with(msgs, {events[1] - 200: [((("schema", b"f144"),), huge)] * 2})
    assert reasons == ["huge_charge", "huge_charge"]
    Result.of(pipe).check_same_as(clean_result)


def test_bluesky_windows_outside_int64_are_refused(fuzz_run: Any, clean_result: Result) -> None:
    """A window ending at 1e30 ns was taken: it closed only at the end of the run, first,
    and took the events of the steps announced after it."""
    msgs = fuzz_run[0]
    doc = {"descriptor": "d", "data": {"omega": 1.0, "count_start_ns": 5, "count_stop_ns": 10**30}}
    bad = json.dumps(["event", doc]).encode()
    headers = (("schema", b"bluesky-json"), ("document", b"event"))
    pipe, reasons = _fold_with(msgs, {10: [(headers, bad)]})
    assert reasons == ["malformed_bluesky-json"]
    Result.of(pipe).check_same_as(clean_result)


def test_a_repeated_bluesky_event_is_refused(fuzz_run: Any, clean_result: Result) -> None:
    """An Event document delivered again (a producer's retry) added an empty orientation;
    one delivered before an earlier step's took that step's events as taken while moving.
    The end of the latest window survives a checkpoint."""
    msgs = fuzz_run[0]
    events = _bluesky_events(msgs)
    again = [(tuple(msgs[events[0]].headers), msgs[events[0]].payload)]
    pipe, reasons = _fold_with(msgs, {events[0] + 1: again, events[1] + 5: again})
    assert reasons == ["malformed_bluesky-json"] * 2
    Result.of(pipe).check_same_as(clean_result)
    # through a checkpoint
    first = RunPipeline(background=False)
    _feed(first, msgs[: events[0] + 1])
    js, arrays = first.state()
    resumed = RunPipeline(background=False)
    resumed.restore(json.loads(json.dumps(js)), arrays)
    with pytest.raises(MalformedMessage, match="previous"):
        _feed(resumed, msgs[events[0] : events[0] + 1])


@pytest.mark.parametrize("payload", [b'"ab"', b"[1, 2]", b'["event"]', b'[{"a": 1}, "start"]'])
def test_bluesky_messages_are_name_document_pairs(fuzz_run: Any, payload: bytes) -> None:
    """``"ab"`` or ``[1, 2]`` unpacked into a name and a document and were ignored."""
    msgs = fuzz_run[0]
    pipe = RunPipeline(background=False)
    _feed(pipe, msgs[:5])
    with pytest.raises(MalformedMessage) as err:
        pipe.handle("bluesky-json", payload, 0, None)
    assert err.value.reason == "malformed_bluesky-json"


def test_events_of_pulses_beyond_2_62_are_counted(fuzz_run: Any, clean_result: Result) -> None:
    """Events of pulses at or after 2**62 ns were neither folded nor counted as dropped."""
    msgs = fuzz_run[0]
    late = bytes(serialise_ev44("x", 0, [2**62, 2**63 - 1], [0, 2], [1000, 2000, 3000], [5, 6, 7]))
    pipe, reasons = _fold_with(msgs, {100: [((("schema", b"ev44"),), late)]})
    assert reasons == []
    result = Result.of(pipe)
    result.check_accounted()
    result.check_same_as(clean_result)
    assert result.events_dropped == clean_result.events_dropped + 3
