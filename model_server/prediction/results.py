"""What :func:`model_server.prediction.predict.predict` returns: the outputs, their JSON and their
PNG.

Units and axes of every output are in the class docstrings and repeated in the JSON
(:meth:`Prediction.to_dict`); NaN and inf become ``null``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.prediction.fc_source import FC_MODEL_NAME, ModelFCs
from model_server.prediction.indirect import IndirectSpectrum
from model_server.prediction.spectra import PhononDOS

__all__ = [
    "DEFAULT_OUTPUTS",
    "OUTPUTS",
    "DetectorPrediction",
    "IQEPrediction",
    "PowderPrediction",
    "Prediction",
    "json_array",
]

#: What the ``components`` of the outputs are (the JSON repeats it).
COMPONENTS_DESCRIPTION = {
    "elastic": "incoherent elastic line: sigma_inc/(4 pi) exp(-Q^2 <u^2>) x the resolution "
    "at E = 0, averaged over each energy bin",
    "multiphonon": "incoherent multiphonon orders 2-3 in the incoherent approximation "
    "(total cross sections; the DOS-weighted response self-convolved)",
    "tof_background": "a background flat in time of flight, per pixel by solid angle, with "
    "background_fraction of the events (intensity ~ (Ei - E)^-2)",
    "can": "an aluminium can (can_atoms Al atoms per sample atom): coherent one-phonon "
    "powder S(|Q|, E), multiphonon, elastic line and Debye-Scherrer rings",
}
#: The outputs a prediction can return.
OUTPUTS = ("iqe", "detector", "powder", "dos", "indirect")
#: The outputs of a request that names none.
DEFAULT_OUTPUTS = ("iqe", "detector", "powder")


@dataclass(frozen=True, slots=True, kw_only=True)
class IQEPrediction:
    """Folded I(q, E) of the requested orientations together.

    Attributes
    ----------
    intensity
        (n_q, n_E) coverage-weighted mean S(Q, E) per bin, mbarn/(sr meV) per atom; NaN
        where no orientation covers the bin.
    coverage
        (n_q, n_E) sum of k_f/k_i dOmega dE folded into each bin, sr meV (the service's
        exposure per uC).
    signal
        (n_q, n_E) ``intensity x coverage``, mbarn per atom (expected counts = flux x atoms x
        signal).
    dispersion
        (n_q, n_branches) phonon energies on the path (the forward model's), meV.
    components
        Background component -> (n_q, n_E) its coverage-weighted mean in the same units
        (:mod:`simulations.lattice.backgrounds`); the total expected intensity is
        ``intensity`` plus their sum.
    """

    intensity: NDArray[np.float64]
    coverage: NDArray[np.float64]
    signal: NDArray[np.float64]
    dispersion: NDArray[np.float64]
    components: dict[str, NDArray[np.float64]] = field(default_factory=dict)

    @property
    def total(self) -> NDArray[np.float64]:
        """(n_q, n_E) one-phonon plus every component."""
        return np.asarray(self.intensity + sum(self.components.values(), np.zeros(1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorPrediction:
    """Expected S(Q, E) on the detector for each orientation.

    Attributes
    ----------
    angle_edges
        (n_angle + 1,) in-plane scattering angle bin edges, degrees (+ towards +x).
    intensity
        (n_omega, n_angle, n_E) weighted mean S per bin, mbarn/(sr meV) per atom; NaN where
        no detector lies in an angle bin.
    q_magnitude
        (n_angle, n_E) |Q| at each bin centre in the horizontal plane, 1/Angstrom.
    components
        Background component -> (n_angle, n_E), the same at every omega (functions of
        |Q| and E), same units.
    """

    angle_edges: NDArray[np.float64]
    intensity: NDArray[np.float64]
    q_magnitude: NDArray[np.float64]
    components: dict[str, NDArray[np.float64]] = field(default_factory=dict)

    @property
    def angles(self) -> NDArray[np.float64]:
        """(n_angle,) bin centres, degrees."""
        return 0.5 * (self.angle_edges[1:] + self.angle_edges[:-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderPrediction:
    """Coherent one-phonon powder spectrum.

    Attributes
    ----------
    q
        (n_Q,) |Q| bin centres, 1/Angstrom.
    intensity
        (n_Q, n_E) spherical average of S(Q, E), mbarn/meV per atom.
    accessible
        (n_Q, n_E) bool: reached by the detector's scattering angles at Ei.
    directions, seed
        Directions averaged at every |Q| and the seed of their random rotations.
    components
        Background component -> (n_Q, n_E), mbarn/(sr meV) per atom: ``elastic``,
        ``multiphonon`` and ``can`` (the time-of-flight background is the detector's, not
        the sample's, and is left out of the powder output).
    """

    q: NDArray[np.float64]
    intensity: NDArray[np.float64]
    accessible: NDArray[np.bool_]
    directions: int
    seed: int
    components: dict[str, NDArray[np.float64]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """What :func:`predict` returns; :meth:`to_dict` is the endpoint's JSON, :meth:`to_png`
    its image."""

    material: str
    fc_label: str
    fc_names: tuple[str, ...]
    coefficients: NDArray[np.float64]
    ei: float
    temperature: float
    omegas: NDArray[np.float64]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    instrument: dict[str, Any]
    resolution: dict[str, Any]
    energy_edges: NDArray[np.float64]
    qpoints: NDArray[np.float64]
    q_distance: NDArray[np.float64]
    ticks: tuple[tuple[int, str], ...]
    stable: bool
    min_frequency_thz: float
    warnings: tuple[str, ...] = ()
    iqe: IQEPrediction | None = None
    detector: DetectorPrediction | None = None
    powder: PowderPrediction | None = None
    dos: PhononDOS | None = None
    indirect: IndirectSpectrum | None = None
    formula: str = ""
    n_atoms: int = 0
    fc_source: str = "reference"
    fc_details: dict[str, Any] = field(default_factory=dict)
    model: ModelFCs | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def in_domain(self) -> bool | None:
        """The e3nn model's verdict on its prediction (``None`` for other FC sources)."""
        return None if self.model is None else self.model.in_domain

    @property
    def energies(self) -> NDArray[np.float64]:
        """(n_E,) energy bin centres, meV."""
        return 0.5 * (self.energy_edges[1:] + self.energy_edges[:-1])

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs computed."""
        return tuple(o for o in OUTPUTS if getattr(self, o) is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf as None)."""
        coefficients = (
            {}
            if self.fc_source in (FC_MODEL_NAME, "imported")  # per-pair FCs, no coefficients
            else {n: float(c) for n, c in zip(self.fc_names, self.coefficients, strict=True)}
        )
        m = self.model
        out: dict[str, Any] = {
            "material": self.material,
            "formula": self.formula,
            "n_atoms": self.n_atoms,
            "fc_source": self.fc_source,
            "in_domain": self.in_domain,
            "distance": None if m is None else m.distance,
            "message": "" if m is None else m.message,
            "fc_model": None if m is None else m.to_dict(),
            "fc": {
                "label": self.fc_label,
                "source": self.fc_source,
                "units": "eV/A^2",
                "coefficients": coefficients,
                **self.fc_details,
            },
            "ei_meV": self.ei,
            "temperature_K": self.temperature,
            "omegas_deg": self.omegas.tolist(),
            "orientation": {"u": list(self.u), "v": list(self.v)},
            "instrument": self.instrument,
            "resolution": self.resolution,
            "stable": self.stable,
            "min_frequency_thz": self.min_frequency_thz,
            "warnings": list(self.warnings),
            "outputs": list(self.outputs),
            "energy_meV": self.energies.tolist(),
            "energy_edges_meV": self.energy_edges.tolist(),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }
        if self.iqe is not None:
            out["iqe"] = self._iqe_dict(self.iqe)
        if self.detector is not None:
            out["detector"] = self._detector_dict(self.detector)
        if self.powder is not None:
            out["powder"] = self._powder_dict(self.powder)
        if self.dos is not None:
            out["dos"] = self.dos.to_dict()
        if self.indirect is not None:
            out["indirect"] = self.indirect.to_dict()
        return out

    def _iqe_dict(self, iqe: IQEPrediction) -> dict[str, Any]:
        """The ``iqe`` output's JSON."""
        return {
            "description": "folded I(q, E) of the orientations together: coverage-weighted "
            "mean S(Q, E) of the Q folded into each bin (null: not covered)",
            "axes": ["q_index", "energy_meV"],
            "units": "mbarn/(sr meV) per atom",
            "q_index": list(range(len(self.qpoints))),
            "qpoints_rlu": self.qpoints.tolist(),
            "q_distance_inv_angstrom": self.q_distance.tolist(),
            "ticks": [[int(i), str(label)] for i, label in self.ticks],
            "energy_meV": self.energies.tolist(),
            "intensity": json_array(iqe.intensity),
            "coverage": json_array(iqe.coverage),
            "coverage_units": "sr meV",
            "signal": json_array(iqe.signal),
            "signal_units": "mbarn per atom",
            "dispersion_meV": json_array(iqe.dispersion),
            "components": {k: json_array(v) for k, v in iqe.components.items()},
            "total_intensity": json_array(iqe.total),
            "components_description": COMPONENTS_DESCRIPTION,
        }

    def _detector_dict(self, d: DetectorPrediction) -> dict[str, Any]:
        """The ``detector`` output's JSON."""
        return {
            "description": "expected S(Q, E) on the detector per omega: weighted mean over "
            "the pixels of each in-plane scattering-angle bin (tube angle, summed over "
            "the tube height)",
            "axes": ["omega_deg", "angle_deg", "energy_meV"],
            "units": "mbarn/(sr meV) per atom",
            "omega_deg": self.omegas.tolist(),
            "angle_deg": d.angles.tolist(),
            "angle_edges_deg": d.angle_edges.tolist(),
            "energy_meV": self.energies.tolist(),
            "intensity": json_array(d.intensity),
            "q_magnitude_inv_angstrom": json_array(d.q_magnitude),
            "components": {k: json_array(v) for k, v in d.components.items()},
            "components_axes": ["angle_deg", "energy_meV"],
        }

    def _powder_dict(self, p: PowderPrediction) -> dict[str, Any]:
        """The ``powder`` output's JSON."""
        return {
            "description": "coherent one-phonon S(|Q|, E), spherical average over "
            f"{p.directions} directions per |Q| (seed {p.seed})",
            "axes": ["q_inv_angstrom", "energy_meV"],
            "units": "mbarn/meV per atom",
            "q_inv_angstrom": p.q.tolist(),
            "energy_meV": self.energies.tolist(),
            "intensity": json_array(p.intensity),
            "accessible": p.accessible.tolist(),
            "directions": p.directions,
            "seed": p.seed,
            "components": {k: json_array(v) for k, v in p.components.items()},
        }

    def to_png(self, dpi: int = 90) -> bytes:
        """PNG of :meth:`figure`."""
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def figure(self) -> Any:
        """A matplotlib Figure (Agg) with one panel per output (the detector panel: the mean
        over the omegas); its title names the crystal, the FCs and the setting, and says so
        in red when the e3nn model's prediction is out of its domain."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = self.outputs
        fig = Figure(figsize=(5.0 * len(panels), 4.2))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        e = self.energy_edges
        for ax, name in zip(axes, panels, strict=True):
            if name == "iqe" and self.iqe is not None:
                img = np.ma.masked_invalid(self.iqe.intensity.T)
                x = np.arange(len(self.qpoints) + 1) - 0.5
                m = _image(ax, img, (x[0], x[-1], e[0], e[-1]), _norm(self.iqe.intensity))
                for k in range(self.iqe.dispersion.shape[1]):
                    ax.plot(np.arange(len(self.qpoints)), self.iqe.dispersion[:, k], "w-", lw=0.4)
                ax.set_xticks([i for i, _ in self.ticks])
                ax.set_xticklabels([label.replace("G", "Γ") for _, label in self.ticks])
                ax.set_ylim(e[0], e[-1])
                ax.set_xlabel("q-path")
                ax.set_title(f"I(q,E), {len(self.omegas)} orientation(s)")
                fig.colorbar(m, ax=ax, label="mbarn/(sr meV)/atom")
            elif name == "detector" and self.detector is not None:
                d = self.detector
                with warnings.catch_warnings():  # an angle bin without detector: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(d.intensity, axis=0)
                extent = (d.angle_edges[0], d.angle_edges[-1], e[0], e[-1])
                m = _image(ax, np.ma.masked_invalid(mean.T), extent, _norm(mean))
                ax.set_xlabel("scattering angle (deg)")
                label = f"omega {self.omegas[0]:g}" if len(self.omegas) == 1 else "mean of omegas"
                ax.set_title(f"detector S, {label}")
                fig.colorbar(m, ax=ax, label="mbarn/(sr meV)/atom")
            elif name == "powder" and self.powder is not None:
                p = self.powder
                dq = p.q[1] - p.q[0] if len(p.q) > 1 else 1.0
                q_edges = np.concatenate([p.q - dq / 2, [p.q[-1] + dq / 2]])
                img = np.ma.masked_where(~p.accessible.T, p.intensity.T)
                m = _image(ax, img, (q_edges[0], q_edges[-1], e[0], e[-1]), _norm(p.intensity))
                ax.set_xlabel("|Q| (1/Å)")
                ax.set_title("powder S(|Q|,E)")
                fig.colorbar(m, ax=ax, label="mbarn/meV/atom")
            elif name == "dos" and self.dos is not None:
                _plot_dos(ax, self.dos)
                continue
            elif name == "indirect" and self.indirect is not None:
                _plot_indirect(ax, self.indirect)
                continue
            ax.set_ylabel("E (meV)")
        uses_ei = {"iqe", "detector", "powder"} & set(panels)
        title = (
            f"{self.formula or self.material}, FC {self.fc_label}"
            + (f", Ei {self.ei:g} meV" if uses_ei else "")
            + f", T {self.temperature:g} K"
        )
        if self.model is not None and not self.model.in_domain:
            fig.suptitle(
                f"{title}\nOUT OF THE MODEL'S DOMAIN (distance {self.model.distance:.2f}): "
                "extrapolated force constants, not to be trusted",
                fontsize=10,
                color="red",
                fontweight="bold",
            )
        else:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig


def _plot_dos(ax: Any, dos: PhononDOS) -> None:
    """Total DOS and the partial DOS of each element."""
    ax.plot(dos.energies, dos.total, "k-", lw=1.2, label="total")
    if len(dos.elements) > 1:
        for el, row in zip(dos.elements, dos.by_element, strict=True):
            ax.plot(dos.energies, row, lw=0.9, label=el)
    ax.set_xlabel("E (meV)")
    ax.set_ylabel("DOS (states/meV per cell)")
    ax.set_title(f"phonon DOS, sigma {dos.sigma:g} meV")
    ax.legend(fontsize=8)


def _plot_indirect(ax: Any, spec: IndirectSpectrum) -> None:
    """The banks' average, each bank, and the fundamentals alone."""
    ax.plot(spec.energies, spec.total, "k-", lw=1.2, label="mean of banks")
    for bank, row in zip(spec.instrument.banks, spec.by_bank, strict=True):
        ax.plot(spec.energies, row, lw=0.7, ls="--", label=bank)
    if spec.orders > 1:
        ax.plot(spec.energies, spec.by_order[0], lw=0.7, ls=":", label="fundamentals")
    ax.set_xlabel("E (meV)")
    ax.set_ylabel("S(E) (mbarn/(sr meV)/atom)")
    ax.set_title(f"{spec.instrument.name}-like S(E), {spec.orders} order(s)")
    ax.legend(fontsize=8)


def _image(ax: Any, img: Any, extent: tuple[float, ...], norm: Any) -> Any:
    """An image on uniform bins (all axes here are uniform)."""
    return ax.imshow(
        img,
        origin="lower",
        aspect="auto",
        extent=extent,
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
    )


def _norm(a: NDArray[np.float64]) -> Any:
    """Square-root colour scale up to the 99.5th percentile (weak branches stay visible)."""
    from matplotlib.colors import PowerNorm

    finite = a[np.isfinite(a) & (a > 0)]
    top = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    return PowerNorm(0.5, vmin=0.0, vmax=top)


def json_array(a: NDArray[Any]) -> list[Any]:
    """Nested lists with NaN and inf as None."""
    arr = np.asarray(a, dtype=float)
    bad = ~np.isfinite(arr)
    if not bad.any():
        out: list[Any] = arr.tolist()
        return out
    obj = arr.astype(object)
    obj[bad] = None
    result: list[Any] = obj.tolist()
    return result
