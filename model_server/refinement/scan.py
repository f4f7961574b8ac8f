"""The grid of starts of the live fits, off the live path.

The refinement's scan (:func:`~model_server.refinement.fit.refine` with ``spread``: 16
starts around the VAE's estimate, tried when the best fit misfits beyond the counts'
noise) is what keeps the calibration study free of most wrong minima of the
nearest-neighbour pair, but it costs 16 fits: too much for the service's one-snapshot
latency, and at a few counts a bin a wrong minimum can fit the counts within their noise,
where no misfit test sees it. The live loop therefore hands its recheck snapshots' fits to
a :class:`BackgroundScan`, which runs the scan on a thread of its own whatever the misfit
(one at a time; a snapshot offered while one runs is skipped and counted) and keeps the
coefficients of a better minimum when the grid found one. The
loop's next snapshot adds them to its starts, beside the warm start in the old basin:
the lower deviance wins there, as within one fit, so a scan can only move the running
estimate to a better fit of the counts.

After a scan that found nothing lower, the next waits until the run has twice as many
orientations (:meth:`due`), so a run of n orientations costs about log2(n) scans. The
loop's rechecks between scans hand over their start from the VAE alone (``grid=False``):
one fit from there beside the live optimum, also off the live path, which then fits from
its warm start only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.refinement.counts import CountsModel
from model_server.refinement.fit import Prior, Refined, refine
from simulations.threads import yield_cpu

__all__ = ["BackgroundScan", "ScanResult"]

logger = logging.getLogger(__name__)

#: How much lower than the live fit's (Poisson deviance units) the scan's best must end
#: for its coefficients to be handed to the next snapshot.
FOUND_DEVIANCE = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanResult:
    """What one background scan found.

    Attributes
    ----------
    n_orientations
        The snapshot it scanned (orientations folded).
    found
        Whether the scan ended lower than the live fit it was started beside (by more than
        :data:`FOUND_DEVIANCE`).
    coefficients
        The best fit's coefficients by name, eV/A^2 (the live fit's own when nothing better
        was found).
    start
        The winning start's label (``"warm"``: the live fit's optimum, carried on).
    deviance_per_dof, live_deviance_per_dof
        The scan's best and the live fit's, on the same counts and model.
    seconds
        Wall time of the scan.
    grid
        Whether it scanned the grid of starts (else it fitted from the VAE's start alone).
    """

    n_orientations: int
    found: bool
    coefficients: dict[str, float]
    start: str
    deviance_per_dof: float
    live_deviance_per_dof: float
    seconds: float
    grid: bool = True

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (the ``scan`` object of a running estimate that adopted it)."""
        return {
            "n_orientations": self.n_orientations,
            "found": self.found,
            "start": self.start,
            "grid": self.grid,
            "deviance_per_dof": round(self.deviance_per_dof, 6),
            "live_deviance_per_dof": round(self.live_deviance_per_dof, 6),
            "seconds": round(self.seconds, 3),
        }


class BackgroundScan:
    """Runs the refinement's grid of starts on a thread, one scan at a time.

    Parameters
    ----------
    prior
        The run's priors (:attr:`RunRefiner.prior`).
    max_iter
        Levenberg-Marquardt iterations per start.
    """

    def __init__(self, prior: Prior, *, max_iter: int = 40) -> None:
        self.prior = prior
        self.max_iter = int(max_iter)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: ScanResult | None = None
        #: scans started, and snapshots offered while one ran (not scanned)
        self.started = 0
        self.skipped = 0
        #: the last scan's error, when it failed (it never reaches the live loop)
        self.error: str | None = None
        #: the orientation count from which the next scan is due
        self.next_at = 0

    def due(self, n_orientations: int) -> bool:
        """Whether a snapshot of ``n_orientations`` is due a scan: none has been found
        empty at half as many orientations or more."""
        return int(n_orientations) >= self.next_at

    @property
    def running(self) -> bool:
        """Whether a scan is running now."""
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        model: CountsModel,
        counts: NDArray[np.float64],
        live: Refined,
        start: NDArray[np.float64],
        spread: NDArray[np.float64],
        n_orientations: int,
        *,
        grid: bool = True,
    ) -> bool:
        """Scan the snapshot whose live fit is ``live`` (on ``model`` and ``counts``,
        (n_q, n_E)) around ``start`` ((n_coeff,) the VAE's means, eV/A^2) in steps of
        ``spread`` ((n_coeff,) its stds; NaN where unknown). ``grid=False``: fit from
        ``start`` alone beside the live optimum (no grid; :meth:`due`'s schedule is left
        as it is). Returns False, and counts a skip, while another scan runs."""
        if self.running:
            self.skipped += 1
            return False
        self.started += 1
        job = (
            model,
            np.array(counts, dtype=float),
            live,
            np.array(start),
            np.array(spread),
            bool(grid),
        )
        self._thread = threading.Thread(
            target=self._work, args=(job, int(n_orientations)), name="refine-scan", daemon=True
        )
        self._thread.start()
        return True

    def _work(self, job: tuple[Any, ...], n_orientations: int) -> None:
        """The scan of one snapshot (``job``: :meth:`submit`'s arrays, copied)."""
        model, counts, live, start, spread, grid = job
        what = "scan" if grid else "fit from the VAE's start"
        yield_cpu()  # it takes the CPU the live fold, estimate and advice leave
        t0 = time.perf_counter()
        try:
            # the live optimum is the warm start: the grid only wins by ending lower
            best = refine(
                model,
                counts,
                [start],
                prior=self.prior,
                warm=live.theta,
                spread=spread if grid else None,
                scan_always=grid,
                max_iter=self.max_iter,
            )
        except Exception as exc:  # a failed scan leaves the live estimate as it is
            logger.warning(
                "background %s at %d orientations failed: %s",
                what,
                n_orientations,
                exc,
            )
            self.error = f"{type(exc).__name__}: {exc}"
            if grid:
                self.next_at = 2 * n_orientations
            return
        # lower by more than one unit of deviance (a likelihood ratio of e^0.5): from the
        # grid, or from the live optimum carried further when that had not converged
        found = best.deviance < live.deviance - FOUND_DEVIANCE
        result = ScanResult(
            n_orientations=n_orientations,
            found=found,
            coefficients={n: float(v) for n, v in zip(best.names, best.mean, strict=True)},
            start=best.start,
            deviance_per_dof=best.deviance_per_dof,
            live_deviance_per_dof=live.deviance_per_dof,
            seconds=time.perf_counter() - t0,
            grid=grid,
        )
        logger.info(
            "background %s at %d orientations: %s (deviance/dof %.4f, live %.4f, %.1f s)",
            what,
            n_orientations,
            f"a lower minimum from {best.start!r}" if found else "no lower minimum",
            result.deviance_per_dof,
            result.live_deviance_per_dof,
            result.seconds,
        )
        with self._lock:
            self._result = result
            # nothing lower: wait for twice the orientations (counts) before the next
            if grid:
                self.next_at = n_orientations + 1 if found else 2 * n_orientations

    @property
    def pending(self) -> bool:
        """Whether an answer is still to come or waiting to be taken."""
        with self._lock:
            return self.running or self._result is not None

    def take(self) -> ScanResult | None:
        """The last finished scan's result, once (None when none finished since)."""
        with self._lock:
            out, self._result = self._result, None
        return out

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a running scan; True when none runs."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running
