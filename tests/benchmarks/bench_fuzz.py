"""Fuzzing the consumer at volume (``make bench``): writes bench-results/fuzz.json.

The hostile messages of ``tests/consumers/test_fuzz_wire.py`` (its :func:`hostile` generator), drawn
from a seeded generator instead of hypothesis so that 1e5 cases stay cheap, in two phases:

* **per message**: batches of hostile messages handed one by one to
  ``ConsumerService._handle`` (what the consumer does with every message it routes to the
  pipeline: count, log, dead-letter) on a copy of a pipeline stopped at one of five points
  of a simulated run; after every message: nothing escaped, a refused message was
  dead-lettered once under a reason and left the pipeline as it was, a message built to be
  invalid was refused; after every batch the pipeline finishes the run with the clean
  result (counts, exposure, orientations, events folded; hostile events only as dropped);
* **whole runs**: hostile messages interleaved anywhere into the run (before its start, on
  other partitions, keyed with another run, delivered twice) through
  ``ConsumerService.step`` from an in-memory source: the run completes, dead letters ==
  malformed counters, every invalid message is refused, the result is the offline fold's.

``crashes`` counts exceptions that escaped the consumer, ``internal_errors`` the messages
the consumer caught an unexpected exception for (dead-lettered as ``internal_error``),
``violations`` the broken properties; all three must be 0.

Where ``atheris`` is installed (the ``fuzz`` extra; ``make bench`` installs it when it can),
a third, coverage-guided phase mutates raw bytes under any schema, from the run's real
messages as seeds, into ``RunPipeline.handle`` on a mid-run pipeline (libFuzzer in a
subprocess: only ``MalformedMessage`` may leave ``handle``, and ``finish`` must not raise).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from consumers.messages import SourceMessage
from consumers.reduction.pipeline import RunPipeline, schema_of
from consumers.service import ConsumerService
from simulations.runs.recording import RunReader
from tests.conftest import small_ge_run
from tests.consumers.test_fuzz_wire import (
    OTHER_RUN_KEY,
    RandomDraw,
    Result,
    _feed,
    _time,
    attack_service,
    clone,
    fingerprint,
    hostile,
    interleave,
    key_for,
    make_cuts,
    run_context,
)
from tests.fakes import ListSource

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))

#: inputs of the coverage-guided phase (atheris), and its time limit (s)
ATHERIS_RUNS, ATHERIS_TIMEOUT = 60_000, 300

_ATHERIS_TARGET = """
import copy, json, os, sys, time
import atheris
import consumers.reduction.folding  # numba kernels: left uninstrumented
with atheris.instrument_imports():
    import consumers.reduction.segment, consumers.wire, streaming_data_types
    from consumers.reduction.pipeline import MalformedMessage, RunPipeline, schema_of
from simulations.runs.recording import RunReader

run, n_first, runs, corpus, stats_path = sys.argv[1:6]
with RunReader(run) as reader:
    msgs = [m for _, m in zip(range(int(n_first)), reader)]
base = RunPipeline(background=False)
for m in msgs:
    base.handle(schema_of(m.headers, m.payload), m.payload, m.timestamp_ns, m.key)
SCHEMAS = ["ev44", "f144", "pl72", "6s4t", "bluesky-json", "unknown", None]
stats = {"runs": 0, "refused": 0}
t0 = time.time()

def one(data):
    if not data:
        return
    schema = SCHEMAS[data[0] % len(SCHEMAS)]
    headers = () if schema is None else (("schema", schema.encode()),)
    payload = bytes(data[1:])
    pipe = copy.deepcopy(base, {id(base.folder): base.folder, id(base.meta): base.meta})
    stats["runs"] += 1
    try:
        pipe.handle(schema_of(headers, payload), payload, 0, None)
    except MalformedMessage as exc:
        assert exc.reason
        stats["refused"] += 1
    pipe.finish()
    if stats["runs"] % 1000 == 0:
        with open(stats_path, "w") as f:
            json.dump(dict(stats, seconds=time.time() - t0), f)

# no RSS limit: Linux carries the peak RSS of the parent (the benchmark, a few GB) over
# fork and exec into this process's, where libFuzzer reads it; this one stays at ~0.5 GB
args = ["-runs=" + runs, "-max_len=8192", "-seed=1", "-rss_limit_mb=0", corpus]
atheris.Setup([sys.argv[0], *args], one)
atheris.Fuzz()
"""

#: cases of the per-message phase, and of the whole-run phase
PER_MESSAGE_CASES = 100_000
WHOLE_RUNS, PER_RUN = 12, 400
BATCH = 25  # hostile messages per pipeline copy in the per-message phase


def _label(schema: str) -> str:
    """A schema as a readable key (hostile headers can be long or binary)."""
    return schema if len(schema) <= 16 else f"{schema[:12]}...({len(schema)})"


class _Stats:
    def __init__(self) -> None:
        self.cases = 0
        self.crashes = 0
        self.internal_errors = 0
        self.accepted = 0
        self.batches_compared = 0
        self.violations: list[str] = []
        self.by_schema: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()

    def violation(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(what)
        else:
            self.violations[-1] = f"... and more (last: {what})"


def _per_message(
    stats: _Stats, cuts: dict[str, Any], state_dir: Path, seed: int
) -> tuple[ConsumerService, list[tuple[SourceMessage, str]]]:
    letters: list[tuple[SourceMessage, str]] = []
    service = ConsumerService(
        ListSource([]), state_dir, dead_letter=lambda m, r: letters.append((m, r))
    )
    d = RandomDraw(seed)
    names = sorted(cuts)
    offsets: Counter[str] = Counter()
    while stats.cases < PER_MESSAGE_CASES:
        cut = cuts[d.choice(names)]
        pipe = clone(cut.pipe) if cut.pipe.meta is not None else RunPipeline(background=False)
        service.pipeline = pipe
        unsure = False
        for _ in range(BATCH):
            h = hostile(d, cut.ctx)
            key = key_for(d, cut.ctx)
            topic = f"fuzz_{h.topic_suffix}"
            m = SourceMessage(
                topic=topic, partition=0, offset=offsets[topic], key=key,
                timestamp_ns=_time(d, cut.ctx), headers=h.headers, payload=h.payload,
            )  # fmt: skip
            offsets[topic] += 1
            schema = schema_of(m.headers, m.payload)
            stats.cases += 1
            stats.by_schema[_label(schema)] += 1
            stats.by_kind[h.kind.split(":")[0]] += 1
            before = fingerprint(pipe)
            n_letters = len(letters)
            try:
                service._handle(m, schema)
            except Exception:
                stats.crashes += 1
                stats.violation(f"{h.kind}: escaped: {traceback.format_exc(limit=3)}")
                break
            if len(letters) > n_letters:
                reason = letters[-1][1]
                if len(letters) != n_letters + 1 or not reason:
                    stats.violation(f"{h.kind}: dead-lettered {len(letters) - n_letters}x")
                if reason == "internal_error":
                    stats.internal_errors += 1
                    stats.violation(f"{h.kind}: internal error")
                if fingerprint(pipe) != before:
                    stats.violation(f"{h.kind}: refused ({reason}) but left a trace")
                continue
            stats.accepted += 1
            if not unsure and (
                h.expect == "refuse"
                or (key == OTHER_RUN_KEY and pipe.meta is not None and schema != "pl72")
            ):
                stats.violation(f"{h.kind} ({schema}, key {key!r}) was accepted")
            unsure |= h.expect == "any"
        try:
            pipe.finish()
        except Exception:
            stats.crashes += 1
            stats.violation(f"finish: {traceback.format_exc(limit=3)}")
            continue
        result = Result.of(pipe)
        try:
            result.check_accounted()
            if not unsure:
                result.check_same_as(cut.clean)
                stats.batches_compared += 1
        except AssertionError as exc:
            stats.violation(f"{cut.name}: result changed: {exc}")
    return service, letters


def _whole_runs(
    stats: _Stats, msgs: list[Any], clean: Result, tmp: Path, seed: int
) -> tuple[Counter[str], int, int]:
    ctx = run_context(msgs)
    reasons: Counter[str] = Counter()
    malformed = dead = 0
    for k in range(WHOLE_RUNS):
        d = RandomDraw(seed + k)
        inserts = []
        for _ in range(PER_RUN):
            pos = d.integer(0, len(msgs))
            h = hostile(d, ctx.at(pos))
            if pos == 0 and h.kind.startswith("pl72/second_valid"):
                continue
            inserts.append((pos, h, key_for(d, ctx), d.choice((0, 0, 0, 1)), d.choice((1, 1, 2))))
            stats.cases += 1
            stats.by_schema[_label(schema_of(h.headers, h.payload))] += 1
            stats.by_kind[h.kind.split(":")[0]] += 1
        stream, refuse, unsure = interleave(msgs, inserts)
        try:
            service, letters, compared = attack_service(
                stream, refuse, unsure, clean, tmp / f"run{k}"
            )
        except AssertionError as exc:
            stats.violation(f"whole run {k}: {exc}")
            continue
        except Exception:
            stats.crashes += 1
            stats.violation(f"whole run {k}: escaped: {traceback.format_exc(limit=3)}")
            continue
        stats.batches_compared += compared
        reasons.update(r for _, r in letters)
        malformed += sum(v for c, v in service.counters.items() if c.startswith("malformed_"))
        dead += len(letters)
        stats.internal_errors += sum(r == "internal_error" for _, r in letters)
    return reasons, malformed, dead


def _atheris(run: Path, ctx: Any, tmp: Path) -> dict[str, Any]:
    """The coverage-guided phase, when atheris is installed."""
    if importlib.util.find_spec("atheris") is None:
        return {"skipped": "atheris is not installed (pip install atheris)"}
    schemas = ["ev44", "f144", "pl72", "6s4t", "bluesky-json", "unknown"]
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, (headers, payload) in enumerate(ctx.samples.values()):
        schema = dict(headers).get("schema", b"unknown").decode()
        (corpus / f"seed{i}").write_bytes(bytes([schemas.index(schema)]) + payload)
    target = tmp / "atheris_target.py"
    target.write_text(_ATHERIS_TARGET)
    stats_path = tmp / "atheris.json"
    t = time.perf_counter()
    cmd = [sys.executable, str(target), str(run), "600", str(ATHERIS_RUNS), str(corpus)]
    proc = subprocess.run(
        [*cmd, str(stats_path)],
        capture_output=True,
        text=True,
        timeout=ATHERIS_TIMEOUT,
        check=False,
        cwd=tmp,  # crash reproducers (crash-*) land here
    )
    out: dict[str, Any] = {"returncode": proc.returncode, "seconds": time.perf_counter() - t}
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        out.update(runs=stats["runs"], refused=stats["refused"])
    cov = [line for line in proc.stderr.splitlines() if " cov: " in line]
    out["last_status"] = cov[-1] if cov else ""
    if proc.returncode != 0:
        out["tail"] = proc.stderr[-3000:]
    return out


def bench_fuzz_consumer(tmp_path: Path) -> None:
    t_run = time.perf_counter()
    path, summary, acc = small_ge_run(tmp_path / "ge.steer", (0.0, 20.0, 40.0), seed=5)
    with RunReader(path) as reader:
        msgs = list(reader)
    clean_pipe = RunPipeline(background=False)
    _feed(clean_pipe, msgs)
    clean_pipe.finish()
    clean = Result.of(clean_pipe)
    assert clean.events_folded == summary["events_folded"]  # the offline fold's
    assert (clean.counts == acc.counts).all()
    cuts = make_cuts(msgs)
    t_run = time.perf_counter() - t_run

    stats = _Stats()
    log = logging.getLogger("consumers")
    level = log.level
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN orientation vectors and such
        log.setLevel(logging.ERROR)  # one warning per refused message otherwise
        try:
            service, letters = _per_message(stats, cuts, tmp_path / "state", seed=20261123)
        finally:
            log.setLevel(level)
        t1 = time.perf_counter()
        run_reasons, run_malformed, run_dead = _whole_runs(stats, msgs, clean, tmp_path, 77)
    t2 = time.perf_counter()
    coverage_guided = _atheris(path, cuts["mid_run_bluesky"].ctx, tmp_path)

    malformed = sum(v for c, v in service.counters.items() if c.startswith("malformed_"))
    by_reason = Counter(r for _, r in letters) + run_reasons
    if malformed != len(letters) or run_malformed != run_dead:
        stats.violation(f"malformed {malformed + run_malformed} != dead {len(letters) + run_dead}")
    out = {
        "cases": stats.cases,
        "crashes": stats.crashes,
        "internal_errors": stats.internal_errors,
        "violations": len(stats.violations),
        "malformed": malformed + run_malformed,
        "dead_lettered": len(letters) + run_dead,
        "accepted_per_message": stats.accepted,
        "by_schema": dict(stats.by_schema.most_common()),
        "by_reason": dict(by_reason.most_common()),
        "by_kind": dict(stats.by_kind.most_common()),
        "seconds": t2 - t0,
        "phases": {
            "per_message": {"cases": PER_MESSAGE_CASES, "seconds": t1 - t0},
            "whole_runs": {"runs": WHOLE_RUNS, "per_run": PER_RUN, "seconds": t2 - t1},
        },
        "results_compared_with_clean_fold": stats.batches_compared,
        "cases_per_second": stats.cases / (t2 - t0),
        "run": {"messages": len(msgs), "orientations": clean.orientations, "seconds": t_run},
        "violation_examples": stats.violations[:10],
        "atheris": coverage_guided,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "by_kind"}, indent=2, default=str))
    assert stats.cases >= 100_000
    assert stats.crashes == 0
    assert stats.internal_errors == 0
    assert not stats.violations, stats.violations[:5]
    assert coverage_guided.get("returncode", 0) == 0, coverage_guided.get("tail")
