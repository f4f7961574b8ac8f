"""The physics demo that ``steer demo`` (and ``make demo``) runs until streaming exists."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from simulations.fcdb.dataset import generate_dataset
from simulations.fcdb.reference import gamma_optical_thz, load_reference, named_fc_set
from simulations.lattice.materials import setup
from simulations.lattice.phonopy_export import write_phonopy_params
from simulations.plotting import plot_dispersion

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def run_demo(out: str | Path, *, n: int = 2000, material: str = "Ge") -> dict[str, object]:
    """Build Ge's model, draw its FC sets, export one to phonopy, generate a small training set,
    simulate a 12-orientation run and check it against the dispersion it was made from.

    Returns a JSON-ready summary; files go to ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ms = setup(material)
    ref = load_reference(material)
    fm = ms.forward_model(dtype=torch.float64, method="exact")
    sets: dict[str, object] = {}
    for name in ref.fc_set_names():
        coeffs = named_fc_set(material, name, ms)
        with torch.no_grad():
            result = fm.spectra(coeffs[None])
            freqs = fm.frequencies(coeffs[None])[0].numpy()
        png = plot_dispersion(
            ms.grid,
            result.intensity[0].numpy(),
            freqs,
            out / f"{material}_{name}.png",
            title=f"{material}, FC set {name}",
        )
        nu = round(gamma_optical_thz(ms.basis, coeffs), 4)
        sets[name] = {
            "gamma_optical_thz": nu,
            "stable": bool(result.stable[0]),
            "in_training_domain": bool(ref.in_domain(coeffs).all()),
            "plot": str(png),
        }
        logger.info("%s %s: optical mode at Gamma %.3f THz", material, name, nu)
    export = write_phonopy_params(
        ms.basis, named_fc_set(material, ref.fc_set_names()[-1], ms), out / "phonopy"
    )
    summary = generate_dataset(
        material, n, out / f"{material}_train.h5", material_setup=ms, command="steer demo"
    )
    # the synthetic instrument: a short rotation run, read back and binned simply
    from simulations.runs.check import check_run
    from simulations.runs.simulate import RunPlan, simulate_run

    fc = "raman" if "raman" in ref.fc_set_names() else "mlff_mean"
    run_file = out / f"{material}_run.steer"
    run = simulate_run(
        RunPlan(material=material, fc=fc, omegas=tuple(range(0, 120, 10)), seed=1),
        run_file,
        progress=False,
    )
    check = check_run(run_file, out=out / f"{material}_run_check.png", progress=False)
    return {
        "material": material,
        "grid": ms.grid.to_dict(),
        "n_coefficients": ms.basis.n_coefficients,
        "kept": list(ref.kept),
        "fc_sets": sets,
        "phonopy_export": str(export),
        "dataset": summary.to_dict(),
        "simulated_run": run.to_dict(),
        "run_check": check,
        "seconds": round(time.perf_counter() - t0, 2),
    }
