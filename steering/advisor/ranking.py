"""The advisor: rank the next goniometer angles by the information they would add.

For each candidate angle omega the instrument model gives its coverage c_b(omega) of every
(q, E) bin b (sr meV, :meth:`consumers.reduction.folding.Folder.coverage`). Under the current FC
estimate theta the counts it would give are Poisson with mean

    lambda_b(omega) = Q c_b(omega) (kappa g(E_b) I_b(theta) + beta)

with Q the proton charge of one orientation (uC), I the forward model (unit-area branches,
:class:`simulations.lattice.forward.ForwardModel`), g(E) = 1 / (E (1 - exp(-E/kT))) the Bose and
1/omega factors of the one-phonon cross-section that the forward model leaves out (bins with
E <= 0 carry no information on the FCs here and are left out), kappa counts per unit of all
that (fitted to the counts measured so far) and beta a flat background per unit exposure.

The Fisher information of those counts on the FCs (in units of the training-domain width,
so that every FC weighs the same) is

    F(omega) = sum_b (Q c_b kappa g_b)^2 J_b J_b^T / lambda_b,   J_b = dI_b / dtheta,

with J the forward model's Jacobian at the current estimate (autograd, exact broadening).
Measuring omega turns the current posterior precision P0 (from the model server's
covariance, or its std) into P0 + F(omega). Candidates are ranked by **D-optimality**: the
gain ``log det(P0 + F) - log det P0`` (nats x 2), the expected shrinkage of the posterior's
volume. D-optimality does not depend on how the FCs are scaled and rewards pinning down
correlated combinations as much as single FCs; A-optimality (the trace of the covariance,
also reported) would favour whichever FC is worst in the chosen units. The expected std of
every FC after the measurement, ``sqrt(diag((P0 + F)^-1))``, is reported too.

The candidates are sorted by default by the **spectrum's D-optimal gain**: the same
criterion for a model in which every bin's intensity is its own parameter, ``sum_b w_b log(1
+ Q c_b(omega) / max(C_b, floor))`` over the exposure C measured so far (uC sr meV), with
each bin weighted by its scarcity, ``w_b`` proportional to ``1 / sum_c c_b(omega_c)`` over all
the candidates (:func:`scarcity_weights`: the bins with the least exposure to be had go
first, for Ge mostly the rows at the high-symmetry points of the q-path, whose folded
q-region is smallest; in the closed loop this needs fewer orientations than uniform weights
on 7 of 10 seeds, as many on 1, more on 2). That is what the learned estimator needs (it
reads the whole I(q, E)); in the closed loop, sorting by the FCs' gain instead piles the
first 15 picks onto two groups of angles and the estimate's error rises before it falls
(``docs/advisor.md``). ``score="fc"`` sorts by the FCs' gain, which is right for an
estimator that fits the forward model to the counts. Both gains and the expected std of
every FC are reported for every candidate. Without an estimate yet, only the spectrum's gain
can be computed; the output says so.

Scoring is batched over all candidates (one matrix product for the Fisher matrices, one
batched log-determinant): 360 candidates rank in well under a second here (see
``tests/benchmarks/bench_advisor.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from simulations.fcdb.reference import load_reference
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.materials import MaterialSetup, setup
from simulations.units import K_B_MEV_ROUNDED
from steering.exceptions import AdvisorError

__all__ = [
    "MAX_CANDIDATES",
    "SCORES",
    "WEIGHTINGS",
    "Advisor",
    "RankedCandidate",
    "Ranking",
    "candidate_omegas",
    "check_score",
    "check_weighting",
    "scarcity_weights",
]

#: a candidate counts as measured when an angle measured so far is this close (degrees): the
#: goniometer settles within 0.01 degrees of its setpoint (the segmenter's tolerance)
MEASURED_TOLERANCE_DEG = 0.02

#: what :meth:`Advisor.rank` can sort by (its ``score``)
SCORES = ("spectrum", "fc")

#: how :meth:`Advisor.rank` weighs the bins of the spectrum's gain (its ``weighting``)
WEIGHTINGS = ("scarcity", "uniform")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise AdvisorError(f"{name} must be {allowed}, got {value!r}")


def check_score(score: str, name: str = "score") -> None:
    """Refuse a ``score`` that is not one of :data:`SCORES` (``name``: how the caller calls it).

    Raises
    ------
    AdvisorError
        An unknown score.
    """
    _check_choice(score, SCORES, name)


def check_weighting(weighting: str, name: str = "weighting") -> None:
    """Refuse a ``weighting`` that is not one of :data:`WEIGHTINGS`.

    Raises
    ------
    AdvisorError
        An unknown weighting.
    """
    _check_choice(weighting, WEIGHTINGS, name)


def scarcity_weights(coverage: NDArray[np.floating]) -> NDArray[np.float64]:
    """Weights of the bins by how little exposure all the candidates together give them.

    Parameters
    ----------
    coverage
        (n_c, n_b) coverage of every candidate (sr meV), bins flattened.

    Returns
    -------
    (n_b,) ``w_b = 1 / sum_c coverage[c, b]``, scaled to mean 1 over the bins some candidate
    reaches; 0 where none does. A bin with little exposure to be had over the whole range
    weighs much: a small folded q-region (the rows at the high-symmetry points of the
    q-path: for Ge over 0-119 degrees the two Gamma rows carry half the weight) or few
    angles reaching it. One that every angle reaches well weighs little.
    """
    cov = np.asarray(coverage, dtype=float)
    total = cov.sum(axis=0)
    reached = total > 0
    w = np.zeros(total.shape)
    w[reached] = 1.0 / total[reached]
    if reached.any():
        w /= w[reached].mean()
    return w


#: Most candidate angles of an advisor's range (:func:`candidate_omegas`): 0.1 degree over
#: the whole circle.
MAX_CANDIDATES = 3600


def candidate_omegas(
    start: float,
    stop: float,
    step: float,
    instrument: Instrument | None = None,
    *,
    max_candidates: int = MAX_CANDIDATES,
) -> NDArray[np.float64]:
    """Goniometer angles ``start, start + step, ...`` below ``stop`` (degrees).

    Their number is counted from ``start``, ``stop`` and ``step`` before any is made.

    Raises
    ------
    AdvisorError
        For a non-positive step, an empty range, more than ``max_candidates`` angles (the
        message names the limit), or angles outside the goniometer limits of
        ``instrument`` (the message gives both ranges).
    """
    if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)):
        raise AdvisorError(f"candidate range {start}:{stop}:{step} must be finite")
    if step <= 0:
        raise AdvisorError(f"candidate step must be > 0 degrees, got {step}")
    count = (stop - 1e-9 * step - start) / step  # float: may be +-inf for extreme ranges
    if count <= 0:
        raise AdvisorError(f"candidate range {start}:{stop}:{step} deg is empty (stop <= start)")
    if not count <= max_candidates:
        raise AdvisorError(
            f"candidate range {start:g}:{stop:g}:{step:g} deg has {count:.4g} angles; at "
            f"most {max_candidates} are accepted (the candidate limit): use a larger step"
        )
    omegas = np.arange(start, stop - 1e-9 * step, step, dtype=float)
    if len(omegas) == 0:
        raise AdvisorError(f"candidate range {start}:{stop}:{step} deg is empty (stop <= start)")
    if instrument is not None:
        lo, hi = instrument.goniometer_limits
        if omegas.min() < lo or omegas.max() > hi:
            raise AdvisorError(
                f"candidate range {omegas.min():g}..{omegas.max():g} deg is outside the "
                f"goniometer limits {lo:g}..{hi:g} deg of {instrument.name}"
            )
    return omegas


@dataclass(frozen=True, slots=True, kw_only=True)
class RankedCandidate:
    """One candidate angle, scored.

    Attributes
    ----------
    omega
        Goniometer angle, degrees.
    score
        The gain the ranking sorts by (:attr:`Ranking.basis`): the spectrum's D-optimal gain
        or the FCs' (``log det(P0 + F) - log det P0``).
    measured
        Already measured (re-measuring is allowed when it pays).
    new_bins
        Bins with E > 0 it would measure that nothing measured so far covers.
    expected_counts
        Counts it would give in the bins with E > 0 (None without an estimate).
    expected_std
        {FC name: expected std after measuring it, eV/A^2} (empty without an estimate).
    a_gain
        A-optimal gain: the drop of the trace of the covariance (domain-width units).
    spectrum_gain
        D-optimal gain of the spectrum's bins, ``sum_b log(1 + Q c_b / C_b)`` (see
        :meth:`Advisor.rank`).
    fc_gain
        D-optimal gain of the FC posterior (None without an estimate).
    """

    omega: float
    score: float
    measured: bool
    new_bins: int
    expected_counts: float | None
    expected_std: dict[str, float]
    a_gain: float | None
    spectrum_gain: float | None = None
    fc_gain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "omega": self.omega,
            "score": self.score,
            "measured": self.measured,
            "new_bins": self.new_bins,
            "expected_counts": self.expected_counts,
            "expected_std": self.expected_std,
            "a_gain": self.a_gain,
            "spectrum_gain": self.spectrum_gain,
            "fc_gain": self.fc_gain,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranking:
    """The advisor's answer: candidates best first.

    Attributes
    ----------
    candidates
        Ranked, best first.
    basis
        ``"spectrum-d-optimal"``, ``"fisher-d-optimal"`` or ``"coverage"`` (no estimate
        yet: the spectrum's gain alone, which needs none).
    note
        A sentence for people (says when the ranking uses the coverage alone).
    fc_names
        Names of the FCs the scores refer to.
    current_std
        {FC name: std of the current estimate, eV/A^2} (empty without an estimate).
    counts_scale
        kappa (counts per uC per sr meV per unit of g I), fitted or given.
    seconds
        Time the ranking took.
    weighting
        How the spectrum's gain weighs the bins: ``"scarcity"`` or ``"uniform"``.
    """

    candidates: tuple[RankedCandidate, ...]
    basis: str
    note: str
    fc_names: tuple[str, ...]
    current_std: dict[str, float] = field(default_factory=dict)
    counts_scale: float | None = None
    seconds: float = 0.0
    weighting: str = "scarcity"

    @property
    def best(self) -> RankedCandidate:
        """The top candidate."""
        return self.candidates[0]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """JSON-ready dict (the ``top`` best candidates, all by default)."""
        cands = self.candidates if top is None else self.candidates[:top]
        return {
            "basis": self.basis,
            "weighting": self.weighting,
            "note": self.note,
            "fc_names": list(self.fc_names),
            "current_std": self.current_std,
            "counts_scale": self.counts_scale,
            "seconds": round(self.seconds, 4),
            "n_candidates": len(self.candidates),
            "candidates": [c.to_dict() for c in cands],
        }


class Advisor:
    """Ranks candidate angles of one run (material, temperature) by expected information.

    Parameters
    ----------
    material
        Shipped material name or CIF (its grid and training domain are used).
    temperature
        Sample temperature, K (for the Bose factor).
    background
        beta: flat background counts per uC per sr meV per bin (0 by default).
    material_setup
        A prepared :func:`simulations.lattice.materials.setup` (saves its build time).
    """

    def __init__(
        self,
        material: str,
        *,
        temperature: float = 5.0,
        background: float = 0.0,
        material_setup: MaterialSetup | None = None,
    ) -> None:
        if not temperature > 0:
            raise AdvisorError(f"temperature must be > 0 K, got {temperature}")
        if not background >= 0:
            raise AdvisorError(f"background must be >= 0, got {background}")
        self.material = material
        self.ms = material_setup or setup(material)
        ref = load_reference(material)
        self.fc_names = tuple(ref.kept)
        self.domain = np.asarray(ref.domain, dtype=float)
        self.width = self.domain[:, 1] - self.domain[:, 0]
        self.fm = self.ms.forward_model(
            free=ref.kept, reference=ref.mean, dtype=torch.float64, method="exact"
        )
        self.temperature = float(temperature)
        self.background = float(background)
        e = self.ms.grid.energy_centres
        positive = e > 0
        kt = K_B_MEV_ROUNDED * self.temperature
        safe = np.where(positive, e, 1.0)
        #: (n_E,) g(E) = 1 / (E (1 - exp(-E/kT))) for E > 0, else 0 (left out)
        self.g = np.where(positive, 1.0 / (safe * -np.expm1(-safe / kt)), 0.0)
        self._jac_cache: tuple[bytes, NDArray[np.float64], NDArray[np.float64]] | None = None

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(n_q, n_E) of the grid the coverages must have."""
        return self.ms.grid.shape

    def model(self, theta: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Forward model and its Jacobian at ``theta`` (n_fc,) eV/A^2.

        Returns ``(I, J)``: I (n_q * n_E,) and J (n_q * n_E, n_fc) = dI/dtheta x domain
        width (per unit of the training domain), from
        :meth:`simulations.lattice.forward.ForwardModel.jacobian` (exact, about 0.2 s for Ge).
        """
        theta = np.asarray(theta, dtype=float)
        key = theta.tobytes()
        if self._jac_cache is not None and self._jac_cache[0] == key:
            return self._jac_cache[1], self._jac_cache[2]
        intensity2d, jac3d = self.fm.jacobian(theta)
        intensity = intensity2d.reshape(-1)
        jac = jac3d.reshape(intensity.shape[0], -1)
        jac_u = jac * self.width[None, :]
        self._jac_cache = (key, intensity, jac_u)
        return intensity, jac_u

    def rank(
        self,
        omegas: Sequence[float] | NDArray[np.float64],
        coverage: NDArray[np.floating],
        *,
        mean: NDArray[np.float64] | None = None,
        std: NDArray[np.float64] | None = None,
        covariance: NDArray[np.float64] | None = None,
        counts: NDArray[np.floating] | None = None,
        exposure: NDArray[np.floating] | None = None,
        measured: Sequence[float] = (),
        charge: float = 1.0,
        counts_scale: float | None = None,
        prior: str = "model",
        score: str = "spectrum",
        weighting: str = "scarcity",
    ) -> Ranking:
        """Rank candidate angles.

        Parameters
        ----------
        omegas
            (n_c,) candidate angles, degrees.
        coverage
            (n_c, n_q, n_E) coverage of each candidate (sr meV).
        mean, std, covariance
            The current estimate: (n_fc,) mean and std (eV/A^2), or a (n_fc, n_fc)
            covariance instead of the std. Without ``mean`` the ranking uses the coverage
            alone.
        counts, exposure
            (n_q, n_E) counts and exposure (uC sr meV) measured so far (``kappa`` is fitted
            to them; without them ``counts_scale`` is used, else 1).
        measured
            Angles already measured (marked in the output).
        charge
            Proton charge (uC) one new orientation will get.
        counts_scale
            kappa, when it is known rather than fitted.
        prior
            The posterior the gain is measured against: ``"model"`` (the model server's
            std or covariance) or ``"information"`` (the uniform training-domain prior plus
            the Fisher information of the exposure measured so far, at the current
            estimate: the ideal observer's posterior, which, unlike a learned model's
            calibrated std, grows with every orientation, so that candidates that repeat
            what was measured gain less).
        score
            What the candidates are sorted by (both gains are reported):

            * ``"spectrum"`` (default): the D-optimal gain of the spectrum, every bin's
              intensity its own parameter, ``sum_b log(1 + Q c_b / max(C_b, floor))``
              over the bins with E > 0 (Q c the exposure the candidate adds, C what was
              measured, the floor 1e-3 of a typical orientation's). Without an estimate
              this is the only gain, whatever ``score`` says. The learned estimator
              reads the whole I(q, E), and the closed loop shows that it needs the whole
              spectrum measured, its scarcest bins first (``weighting``): sorting by the
              FCs' gain piles the picks onto the few angles most
              sensitive at the current estimate, and its error then rises before it
              falls (docs/advisor.md).
            * ``"fc"``: the D-optimal gain of the FC posterior (Fisher information of the
              Poisson counts, above): the ideal observer's choice, for an estimator that
              fits the forward model to the counts.
        weighting
            How the spectrum's gain weighs its bins:

            * ``"scarcity"`` (default): bin b by ``1 / sum_c c_b(omega_c)``, the inverse of
              the coverage all the candidates passed give it (:func:`scarcity_weights`), so
              that the bins with the least exposure to be had are measured first (small
              folded q-regions at the high-symmetry points, bins few angles reach); bins
              that every angle reaches well fill up whatever is picked. Pass every candidate of
              the run, measured ones too (``measured`` marks them), so that the weights
              describe the whole range.
            * ``"uniform"``: every bin weighs the same.

        Raises
        ------
        AdvisorError
            No candidates, coverages of the wrong shape or not finite, an estimate with
            the wrong number of FCs or a non-positive std, an unknown score, weighting
            or prior.
        """
        t0 = time.perf_counter()
        if prior not in ("model", "information"):
            raise AdvisorError(f"prior must be 'model' or 'information', got {prior!r}")
        check_score(score)
        check_weighting(weighting)
        cands = self._candidates(omegas, coverage, exposure, measured, charge)
        spectrum_gain = _spectrum_gain(cands, charge, weighting)
        if mean is None:
            return self._coverage_ranking(cands, spectrum_gain, weighting, t0)
        theta, c0, p0 = self._estimate_prior(mean, std, covariance)
        # counts are fitted only together with the exposure they were measured with
        gains = self._fc_gains(
            cands,
            theta,
            c0,
            p0,
            counts=None if exposure is None else counts,
            counts_scale=counts_scale,
            charge=charge,
            prior=prior,
        )
        return self._estimate_ranking(cands, spectrum_gain, gains, score, weighting, t0)

    def _candidates(
        self,
        omegas: Sequence[float] | NDArray[np.float64],
        coverage: NDArray[np.floating],
        exposure: NDArray[np.floating] | None,
        measured: Sequence[float],
        charge: float,
    ) -> _Candidates:
        """The candidates checked and flattened onto the grid's bins (see :meth:`rank`)."""
        w = np.asarray(omegas, dtype=float).ravel()
        if len(w) == 0:
            raise AdvisorError("no candidate angles to rank (empty candidate range)")
        cov = np.asarray(coverage, dtype=float)
        n_q, n_e = self.grid_shape
        if cov.shape != (len(w), n_q, n_e):
            raise AdvisorError(
                f"coverage has shape {cov.shape}, expected ({len(w)}, {n_q}, {n_e}) for "
                f"{len(w)} candidates on the {self.material} grid"
            )
        if not np.all(np.isfinite(cov)) or cov.min() < 0:
            raise AdvisorError("coverage must be finite and >= 0")
        if not charge > 0:
            raise AdvisorError(f"charge per orientation must be > 0 uC, got {charge}")
        cov = cov.reshape(len(w), -1)
        g_bins = np.broadcast_to(self.g[None, :], (n_q, n_e)).ravel()
        useful = g_bins > 0
        have = np.zeros(n_q * n_e) if exposure is None else np.asarray(exposure, float).ravel()
        if have.shape != (n_q * n_e,):
            raise AdvisorError(f"exposure must have shape ({n_q}, {n_e})")
        have = np.where(np.isfinite(have), have, 0.0)
        new_bins = ((cov > 0) & (have[None, :] <= 0) & useful[None, :]).sum(axis=1)
        # a measured angle is the goniometer's settled reading: within MEASURED_TOLERANCE_DEG
        done = np.array([any(abs(x - m) <= MEASURED_TOLERANCE_DEG for m in measured) for x in w])
        return _Candidates(
            omegas=w,
            coverage=cov,
            have=have,
            g_bins=g_bins,
            useful=useful,
            new_bins=new_bins,
            measured=done,
        )

    def _coverage_ranking(
        self,
        cands: _Candidates,
        spectrum_gain: NDArray[np.float64],
        weighting: str,
        t0: float,
    ) -> Ranking:
        """The ranking without an estimate: by the spectrum's gain alone."""
        gain = spectrum_gain
        ranked = [
            RankedCandidate(
                omega=float(cands.omegas[i]),
                score=float(gain[i]),
                measured=bool(cands.measured[i]),
                new_bins=int(cands.new_bins[i]),
                expected_counts=None,
                expected_std={},
                a_gain=None,
                spectrum_gain=float(gain[i]),
            )
            for i in np.argsort(-gain, kind="stable")
        ]
        return Ranking(
            candidates=tuple(ranked),
            basis="coverage",
            weighting=weighting,
            note="no FC estimate yet: ranked by expected coverage alone (the exposure "
            "each angle adds where little has been measured"
            + (", most where the whole range gives least)" if weighting == "scarcity" else ")"),
            fc_names=self.fc_names,
            seconds=time.perf_counter() - t0,
        )

    def _estimate_prior(
        self,
        mean: NDArray[np.float64],
        std: NDArray[np.float64] | None,
        covariance: NDArray[np.float64] | None,
    ) -> tuple[NDArray[np.float64], NDArray[np.floating], NDArray[np.floating]]:
        """(theta (n_fc,) eV/A^2, covariance c0 and precision p0 (n_fc, n_fc), both in
        training-domain widths) of the model server's estimate, checked."""
        theta = np.asarray(mean, dtype=float).ravel()
        n_fc = len(self.fc_names)
        if theta.shape != (n_fc,) or not np.all(np.isfinite(theta)):
            raise AdvisorError(
                f"estimate must have {n_fc} finite FCs ({', '.join(self.fc_names)}), "
                f"got {theta.shape[0]}"
            )
        if covariance is not None:
            c_in = np.asarray(covariance, dtype=float)
            if c_in.shape != (n_fc, n_fc) or not np.all(np.isfinite(c_in)):
                raise AdvisorError(f"covariance must be a finite ({n_fc}, {n_fc}) matrix")
            c0 = c_in / np.outer(self.width, self.width)
        elif std is not None:
            s = np.asarray(std, dtype=float).ravel()
            if s.shape != (n_fc,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise AdvisorError(f"std must be {n_fc} finite values > 0 eV/A^2")
            c0 = np.diag((s / self.width) ** 2)
        else:
            raise AdvisorError("an estimate needs its std or covariance")
        try:
            p0 = np.linalg.inv(c0)
            np.linalg.cholesky(p0)
        except np.linalg.LinAlgError as exc:
            raise AdvisorError("the estimate's covariance is not positive definite") from exc
        return theta, c0, p0

    def _counts_scale(
        self,
        signal: NDArray[np.float64],
        cands: _Candidates,
        counts: NDArray[np.floating] | None,
        counts_scale: float | None,
    ) -> float:
        """kappa: given, else fitted to the ``counts`` measured with ``cands.have``, else 1."""
        have, useful = cands.have, cands.useful
        if counts_scale is not None:
            kappa = float(counts_scale)
        elif counts is not None:
            n = np.asarray(counts, dtype=float).ravel()
            if n.shape != have.shape:
                n_q, n_e = self.grid_shape
                raise AdvisorError(f"counts must have shape ({n_q}, {n_e})")
            ok = useful & (have > 0) & np.isfinite(n)
            expected = (have * signal)[ok].sum()
            # counts = kappa * exposure * g I + beta * exposure
            net = n[ok].sum() - self.background * have[ok].sum()
            kappa = float(net / expected) if expected > 0 and net > 0 else 1.0
        else:
            kappa = 1.0
        if not kappa > 0:
            raise AdvisorError(f"counts scale must be > 0, got {kappa}")
        return kappa

    def _fc_gains(
        self,
        cands: _Candidates,
        theta: NDArray[np.float64],
        c0: NDArray[np.floating],
        p0: NDArray[np.floating],
        *,
        counts: NDArray[np.floating] | None,
        counts_scale: float | None,
        charge: float,
        prior: str,
    ) -> _FCGains:
        """The Fisher information each candidate adds under ``theta`` and the gains of the
        FC posterior (against the prior ``c0``/``p0``, or the information one)."""
        n_fc = len(self.fc_names)
        intensity, jac = self.model(theta)
        signal = np.maximum(intensity, 0.0) * cands.g_bins  # g I per bin (0 where E <= 0)
        kappa = self._counts_scale(signal, cands, counts, counts_scale)
        # lambda (n_c, n_b) and the per-bin Fisher weight (Q c kappa g)^2 / lambda
        g_bins = cands.g_bins
        keep = cands.useful & (signal + self.background > 0)
        cb = cands.coverage[:, keep] * charge
        lam = cb * (kappa * signal[keep] + self.background)[None, :]
        amp = cb * (kappa * g_bins[keep])[None, :]
        weight = np.divide(amp * amp, lam, out=np.zeros_like(lam), where=lam > 0)
        jk = jac[keep]
        outer = (jk[:, :, None] * jk[:, None, :]).reshape(len(jk), -1)
        fisher = (weight @ outer).reshape(len(cands.omegas), n_fc, n_fc)
        if prior == "information":
            # the information already gathered: Fisher information is linear in exposure,
            # F(C) = sum_b C_b (kappa g_b)^2 / (kappa g_b I_b + beta) J_b J_b^T
            per_exposure = (kappa * g_bins[keep]) ** 2 / (kappa * signal[keep] + self.background)
            measured_f = ((cands.have[keep] * per_exposure) @ outer).reshape(n_fc, n_fc)
            c0 = np.eye(n_fc) / 12.0  # uniform prior over the training domain
            p0 = np.linalg.inv(c0) + measured_f
            c0 = np.linalg.inv(p0)
        return _posterior_gains(c0, p0, fisher, lam, kappa, self.width)

    def _estimate_ranking(
        self,
        cands: _Candidates,
        spectrum_gain: NDArray[np.float64],
        gains: _FCGains,
        score: str,
        weighting: str,
        t0: float,
    ) -> Ranking:
        """The ranking under an estimate, sorted by ``score``'s gain."""
        by = spectrum_gain if score == "spectrum" else gains.d_gain
        ranked = [
            RankedCandidate(
                omega=float(cands.omegas[i]),
                score=float(by[i]),
                measured=bool(cands.measured[i]),
                new_bins=int(cands.new_bins[i]),
                expected_counts=float(gains.expected_counts[i]),
                expected_std=dict(zip(self.fc_names, map(float, gains.std_after[i]), strict=True)),
                a_gain=float(gains.a_gain[i]),
                spectrum_gain=float(spectrum_gain[i]),
                fc_gain=float(gains.d_gain[i]),
            )
            for i in np.argsort(-by, kind="stable")
        ]
        basis, note = _basis_and_note(score, weighting)
        return Ranking(
            candidates=tuple(ranked),
            basis=basis,
            weighting=weighting,
            note=note,
            fc_names=self.fc_names,
            current_std={
                n: float(x) for n, x in zip(self.fc_names, gains.current_std, strict=True)
            },
            counts_scale=gains.kappa,
            seconds=time.perf_counter() - t0,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Candidates:
    """The candidates of one ranking on the grid's n_b = n_q * n_E bins (flattened)."""

    #: (n_c,) goniometer angles, degrees
    omegas: NDArray[np.float64]
    #: (n_c, n_b) coverage of every candidate, sr meV
    coverage: NDArray[np.float64]
    #: (n_b,) exposure measured so far, uC sr meV (0 where not finite or not given)
    have: NDArray[np.float64]
    #: (n_b,) g(E) of every bin (0 where E <= 0)
    g_bins: NDArray[np.float64]
    #: (n_b,) bool: the bins with E > 0, the only ones that carry information here
    useful: NDArray[np.bool_]
    #: (n_c,) bins with E > 0 each would measure that nothing measured so far covers
    new_bins: NDArray[np.integer]
    #: (n_c,) bool: already measured
    measured: NDArray[np.bool_]


@dataclass(frozen=True, slots=True, kw_only=True)
class _FCGains:
    """What measuring each candidate would do to the FC posterior."""

    #: (n_c,) D-optimal gain, ``log det(P0 + F) - log det P0``
    d_gain: NDArray[np.float64]
    #: (n_c,) A-optimal gain: drop of the trace of the covariance (domain-width units)
    a_gain: NDArray[np.float64]
    #: (n_c, n_fc) expected std of every FC after the measurement, eV/A^2
    std_after: NDArray[np.float64]
    #: (n_c,) counts each would give in the bins with E > 0
    expected_counts: NDArray[np.float64]
    #: (n_fc,) std of the prior the gains are measured against, eV/A^2
    current_std: NDArray[np.float64]
    #: counts per uC per sr meV per unit of g I
    kappa: float


def _spectrum_gain(cands: _Candidates, charge: float, weighting: str) -> NDArray[np.float64]:
    """(n_c,) the spectrum's D-optimal gain: each bin's intensity its own parameter, whose
    precision grows with its exposure, ``sum_b w_b log(1 + Q c_b / max(C_b, floor))``."""
    useful, have = cands.useful, cands.have
    add = cands.coverage[:, useful] * charge  # exposure each candidate would add (uC sr meV)
    floor = 1e-3 * float(np.median(add[add > 0])) if np.any(add > 0) else 1.0
    per_bin = np.log1p(add / np.maximum(have[useful], floor)[None, :])
    if weighting == "scarcity":
        gain: NDArray[np.float64] = per_bin @ scarcity_weights(cands.coverage[:, useful])
        return gain
    return per_bin.sum(1)


def _posterior_gains(
    c0: NDArray[np.floating],
    p0: NDArray[np.floating],
    fisher: NDArray[np.float64],
    lam: NDArray[np.float64],
    kappa: float,
    width: NDArray[np.float64],
) -> _FCGains:
    """The gains of adding ``fisher`` (n_c, n_fc, n_fc) to the precision ``p0`` (covariance
    ``c0``, domain-width units); ``lam`` (n_c, n_b) the expected counts per bin, ``width``
    (n_fc,) the training domain's, eV/A^2."""
    post = p0[None] + fisher
    _, logdet0 = np.linalg.slogdet(p0)
    sign, logdet = np.linalg.slogdet(post)
    d_gain = np.where(sign > 0, logdet - logdet0, 0.0)
    post_cov = np.linalg.inv(post)
    var_after = np.diagonal(post_cov, axis1=1, axis2=2)
    a_gain = np.trace(c0) - var_after.sum(axis=1)
    std_after = np.sqrt(np.maximum(var_after, 0.0)) * width[None, :]
    return _FCGains(
        d_gain=d_gain,
        a_gain=a_gain,
        std_after=std_after,
        expected_counts=lam.sum(axis=1),
        current_std=np.sqrt(np.diag(c0)) * width,
        kappa=kappa,
    )


def _basis_and_note(score: str, weighting: str) -> tuple[str, str]:
    """:attr:`Ranking.basis` and :attr:`Ranking.note` of a ranking under an estimate."""
    if score == "spectrum":
        note = (
            "ranked by the expected D-optimal gain of the spectrum (every bin's intensity "
            "its own parameter"
            + (
                ", the bins the whole range gives least exposure weighing most"
                if weighting == "scarcity"
                else ""
            )
            + "); the FC posterior each pick would give is reported beside"
        )
        return "spectrum-d-optimal", note
    return "fisher-d-optimal", (
        "ranked by the expected D-optimal gain of the FC posterior (Fisher "
        "information of the Poisson counts under the current estimate)"
    )
