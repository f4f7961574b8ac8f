"""``steer`` commands of the learned inversion (:mod:`model_server.inversion`): train a model,
evaluate it, and estimate the FCs of a folded spectrum; and the calibration study of the
likelihood refinement started from it (``evaluate-posterior``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from steering.cli.options import (
    JsonOpt,
    MaterialOpt,
    ModelOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    ThreadsOpt,
    WedgeMeshOpt,
)
from steering.cli.output import command_line, emit

if TYPE_CHECKING:
    from model_server.refinement.fit import Refined

__all__ = ["estimate_cmd", "evaluate_cmd", "evaluate_posterior_cmd", "finetune_cmd", "train_cmd"]

_Num = TypeVar("_Num", int, float)


def train_cmd(
    material: MaterialOpt = "Ge",
    data: Annotated[
        Path, typer.Option("--data", help="Training set (steer simulate dataset --out).")
    ] = Path("train.h5"),
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")] = Path(
        "models/ge"
    ),
    seed: SeedOpt = 0,
    vae_epochs: Annotated[
        int | None, typer.Option("--vae-epochs", help="VAE epochs (10; --powder: 30).")
    ] = None,
    regressor_epochs: Annotated[
        int | None,
        typer.Option("--regressor-epochs", help="Regressor epochs (8; --powder: 20)."),
    ] = None,
    baseline_epochs: Annotated[
        int, typer.Option("--baseline-epochs", help="Baseline CNN epochs.")
    ] = 8,
    threads: ThreadsOpt = 2,
    coverage: Annotated[
        Path | None,
        typer.Option("--coverage", help="Saved coverage bank (.npz) instead of rebuilding it."),
    ] = None,
    calibrate_only: Annotated[
        bool,
        typer.Option(
            "--calibrate-only",
            help="Only redo the calibration and out-of-domain thresholds of the model in "
            "--out (trained on --data).",
        ),
    ] = False,
    powder: Annotated[
        bool,
        typer.Option(
            "--powder",
            help="A powder model from a powder training set (steer simulate dataset --powder).",
        ),
    ] = False,
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="With --powder: 'fc' (the fully connected VAE) or 'cnn' (convolutional).",
        ),
    ] = "fc",
    measured_like: Annotated[
        bool,
        typer.Option(
            "--measured-like",
            help="With --powder: train on measured-like inputs (each set's multiphonon and a "
            "flat-in-time-of-flight background added before the counting; the targets stay "
            "one-phonon), so that the model reads folded runs without their domain shift.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the VAE, the regressor (calibrated) and the baseline CNN; write a frozen model
    (with --powder: a powder model, VAE of --variant and regressor)."""
    from model_server.inversion.training import TrainConfig, recalibrate_model, train_model

    if powder:
        if calibrate_only:
            raise typer.BadParameter("not available for powder models", param_hint="--powder")
        from model_server.inversion.powder.training import PowderTrainConfig, train_powder_model

        pcfg = PowderTrainConfig(
            variant=variant,
            seed=seed,
            vae_epochs=vae_epochs or 30,
            regressor_epochs=regressor_epochs or 20,
            threads=threads,
            measured_like=measured_like,
        )
        emit(
            train_powder_model(
                material, data, out, config=pcfg, progress=not quiet, command=command_line()
            ),
            as_json,
        )
        return
    vae_epochs = vae_epochs or 10
    regressor_epochs = regressor_epochs or 8

    if calibrate_only:
        summary = recalibrate_model(out, data, progress=not quiet, command=command_line())
        emit(summary, as_json)
        return

    config = TrainConfig(
        seed=seed,
        vae_epochs=vae_epochs,
        regressor_epochs=regressor_epochs,
        baseline_epochs=baseline_epochs,
        threads=threads,
    )
    summary = train_model(
        material,
        data,
        out,
        config=config,
        coverage=coverage,
        progress=not quiet,
        command=command_line(),
    )
    emit(summary, as_json)


def evaluate_cmd(
    model: ModelOpt = Path("models/ge"),
    n: Annotated[int, typer.Option("--n", help="Fresh test spectra.")] = 1500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the test set and noise.")] = 123,
    samples: SamplesOpt = 256,
    threads: ThreadsOpt = 2,
    no_write: Annotated[
        bool,
        typer.Option("--no-write", help="Do not write evaluation.json and PNGs to the model."),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Powder models: the test set (steer simulate dataset --powder at a seed not "
            "used in training); default: made afresh with --n and --seed.",
        ),
    ] = None,
    nmse_n: Annotated[
        int, typer.Option("--nmse-n", help="Powder models: test spectra for the NMSE.")
    ] = 300,
    latent: Annotated[
        bool,
        typer.Option(
            "--latent",
            help="Powder models: the latent-space study instead (active dimensions, PCA/UMAP "
            "maps coloured by each FC, latent chi^2 against the counts' deviance on "
            "measured-like spectra of --truths test sets); needs --data.",
        ),
    ] = False,
    truths: Annotated[
        int, typer.Option("--truths", help="--latent: test sets scanned for the chi^2.")
    ] = 20,
    figures: Annotated[
        Path | None,
        typer.Option("--figures", help="--latent: folder for the figures (default: the model's)."),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate on a fresh forward-model test set: R^2 clean and on the 5x5 noise grid,
    calibration (clean, noisy, by orientations), the baseline CNN side by side (a powder
    model: R^2, coverage and NMSE clean and at three Poisson count levels)."""
    import torch

    from model_server.inversion.evaluation import evaluate_model
    from model_server.inversion.kinds import model_kind

    torch.set_num_threads(max(1, threads))
    if latent:
        emit(_latent_powder(model, data, n, truths, figures, no_write, quiet), as_json)
        return
    if model_kind(model) == "powder":
        emit(_evaluate_powder(model, data, n, seed, samples, nmse_n, no_write, quiet), as_json)
        return
    report = evaluate_model(
        model,
        n=n,
        seed=seed,
        n_samples=samples,
        write=not no_write,
        progress=not quiet,
        command=command_line(),
    )
    emit(report, as_json)


def estimate_cmd(
    iqe: Annotated[Path, typer.Argument(help="Folded spectrum file (steer fold --out).")],
    model: ModelOpt = Path("models/ge"),
    samples: SamplesOpt = 256,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    first: Annotated[
        int | None,
        typer.Option("--orientations", help="Use only the run's first N orientations."),
    ] = None,
    refine: Annotated[
        bool,
        typer.Option(
            "--refine",
            help="Also fit every coefficient to the counts (Poisson likelihood), started "
            "from the VAE's estimate; prints {vae, refined}.",
        ),
    ] = False,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="With --refine: fit again with the exact-fold correction made at the "
            "optimum (the cross-section at every folded sample's own Q; about 19 s an "
            "orientation on one core); prints the corrected fit as refined, the first as "
            "refined_model_only.",
        ),
    ] = False,
    first_order: Annotated[
        bool,
        typer.Option(
            "--first-order",
            help="With --refine: fit again with the counts model's first-order terms across "
            "the folding tube (each mode's intensity-weighted offsets and its eigenvector's "
            "change; close modes split together, each branch its own line) as factors made "
            "at the optimum, from every orientation's offsets' tensors (1.4-2.8 s an "
            "orientation on one core; the model then 0.5 % per bin from the exact fold "
            "instead of 2 %, 89 % of the bins within 2 % instead of 49 %); prints the "
            "corrected fit as refined, the first as refined_model_only. Instead of --exact.",
        ),
    ] = False,
    exact_passes: Annotated[
        int,
        typer.Option(
            "--exact-passes",
            min=1,
            help="With --exact or --first-order: make the correction again at each "
            "corrected optimum and fit again, this many corrections in all (each costs the "
            "exact fold again; the first-order terms' tensors are made once); "
            "refined.exact_correction (or first_order_correction).moved_std says how far "
            "each pass moved the fit.",
        ),
    ] = 1,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            help="With --exact: orientations folded at a time, on threads (default: the "
            "CPU cores this process may use; 0.1-0.3 GB of memory each); the result "
            "does not depend on it.",
        ),
    ] = None,
    wedge: Annotated[
        Path | None,
        typer.Option(
            "--wedge",
            "--binned",
            help="With --refine: fit the counts of this file instead, the same run folded "
            "another way: on the whole irreducible wedge (steer fold --binning wedge: about "
            "15x the counts of the path) or on the path's bins split by zone class (steer "
            "fold --binning classes: the same counts, 2-5x tighter for the 1NN pair); the "
            "VAE's start still comes from IQE.",
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """FC estimate (mean, std, quantiles, out-of-domain flag) of a folded spectrum; with
    --refine, the likelihood refinement against its counts beside it."""
    if exact and not refine:
        raise typer.BadParameter("--exact corrects the refinement: give --refine too")
    if first_order and not refine:
        raise typer.BadParameter("--first-order corrects the refinement: give --refine too")
    if exact and first_order:
        raise typer.BadParameter("give --exact or --first-order, not both")
    if exact_passes != 1 and not (exact or first_order):
        raise typer.BadParameter(
            "--exact-passes repeats the correction: give --exact or --first-order too"
        )
    if jobs is not None and not exact:
        raise typer.BadParameter(
            "--jobs is for the exact fold: give --exact too (--first-order makes its "
            "tensors one orientation after another)"
        )
    if jobs is not None and jobs < 1:
        raise typer.BadParameter(f"must be >= 1, got {jobs}", param_hint="--jobs")
    binning = "path"
    if wedge is not None:
        if not refine:
            raise typer.BadParameter("--wedge is what --refine fits: give --refine too")
        binning = _check_wedge_file(iqe, wedge)
    from model_server.inversion.inference import Estimator
    from model_server.inversion.kinds import model_kind

    if model_kind(model) == "powder":
        from model_server.inversion.powder.inference import PowderEstimator

        powder_est = PowderEstimator(model, n_samples=samples)
        vae_powder = powder_est.estimate_file(iqe, first=first).to_dict()
        if not refine:
            emit(vae_powder, as_json)
            return
        if exact or first_order:
            raise typer.BadParameter(
                "the counts model's corrections are for single-crystal runs, not powder ones",
                param_hint="--first-order" if first_order else "--exact",
            )
        from model_server.refinement.powder import refine_powder_file

        start = {name: float(v["mean"]) for name, v in vae_powder["fc"].items()}
        refined_powder = refine_powder_file(iqe, start, first=first)
        emit({"vae": vae_powder, "refined": refined_powder.to_dict()}, as_json)
        return
    estimator = Estimator(model, device=device, n_samples=samples)
    vae = estimator.estimate_file(iqe, first=first).to_dict()
    if not refine:
        emit(vae, as_json)
        return
    from model_server.refinement.exact import refine_file_exact
    from model_server.refinement.refiner import refine_file
    from simulations.lattice.forward import usable_cores

    start = {name: float(v["mean"]) for name, v in vae["fc"].items()}
    spread = {name: float(v["std"]) for name, v in vae["fc"].items()}
    counts_file = iqe if wedge is None else wedge
    if exact or first_order:
        corrected, first_fit, correction = refine_file_exact(
            counts_file,
            start,
            first=first,
            spread=spread,
            passes=exact_passes,
            on_pass=None
            if quiet or exact_passes == 1
            else functools.partial(
                _show_exact_pass, kind="first-order" if first_order else "exact-fold"
            ),
            progress=not quiet and not as_json,
            workers=jobs if jobs is not None else usable_cores(),
            first_order=first_order,
        )
        key = "first_order_correction" if first_order else "exact_correction"
        out = {
            "vae": vae,
            "refined": corrected.to_dict() | {key: correction, "binning": binning},
            "refined_model_only": first_fit.to_dict(),
        }
        emit(out, as_json)
        return
    refined = refine_file(
        counts_file, start, first=first, spread=spread, progress=not quiet and not as_json
    )
    emit({"vae": vae, "refined": refined.to_dict() | {"binning": binning}}, as_json)


def _show_exact_pass(k: int, fit: Refined, moved_std: float, *, kind: str = "exact-fold") -> None:
    """``steer estimate --exact-passes``: one line on stderr per corrected fit (each pass
    costs the exact fold again, so the fits are shown as they come); ``kind`` names the
    correction."""
    coeffs = ", ".join(
        f"{n} {m:.4f} +- {s:.4f}" for n, m, s in zip(fit.names, fit.mean, fit.std, strict=True)
    )
    typer.echo(
        f"{kind} pass {k}: deviance/dof {fit.deviance_per_dof:.3f}, "
        f"moved {moved_std:.2f} std, converged {fit.converged}; {coeffs}",
        err=True,
    )


def _check_wedge_file(iqe: Path, wedge: Path) -> str:
    """``steer estimate --wedge``: the file is a wedge or zone-class fold of the same run
    as ``iqe``; returns its binning's kind."""
    from model_server.exceptions import RefinementError
    from model_server.refinement.refiner import file_binning, read_counts_file

    try:
        kind = str(file_binning(wedge)["kind"])
        if kind == "path":
            raise RefinementError(
                f"{wedge} is folded on the q-path (steer fold --binning wedge or classes)"
            )
        _, path_start, path_omegas, _, _ = read_counts_file(iqe)
        _, wedge_start, wedge_omegas, _, _ = read_counts_file(wedge)
    except RefinementError as exc:
        raise typer.BadParameter(str(exc), param_hint="--wedge") from exc
    if path_start.get("run_id") != wedge_start.get("run_id") or path_omegas != wedge_omegas:
        raise typer.BadParameter(
            f"{wedge} is not a fold of the same run as {iqe} (run "
            f"{wedge_start.get('run_id')!r}, {len(wedge_omegas)} orientations; against "
            f"{path_start.get('run_id')!r}, {len(path_omegas)})",
            param_hint="--wedge",
        )
    return kind


def _latent_powder(
    model: Path,
    data: Path | None,
    n: int,
    truths: int,
    figures: Path | None,
    no_write: bool,
    quiet: bool,
) -> dict[str, object]:
    """``steer evaluate --latent``: the latent study of a powder model on the test set
    ``data``; JSON beside the model (``latent.json``) unless ``no_write``."""
    import json

    from model_server.exceptions import TrainingError
    from model_server.inversion.kinds import model_kind
    from model_server.inversion.powder.latent_study import latent_study

    if model_kind(model) != "powder":
        raise TrainingError(f"--latent studies powder models; {model} is a single-crystal one")
    if data is None:
        raise typer.BadParameter("the latent study needs a fresh test set", param_hint="--data")
    result = latent_study(
        model,
        data,
        n_map=n,
        n_truths=truths,
        figures=figures or (None if no_write else model),
        progress=not quiet,
    )
    result["command"] = command_line()
    if not no_write:
        (model / "latent.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _evaluate_powder(
    model: Path,
    data: Path | None,
    n: int,
    seed: int,
    samples: int,
    nmse_n: int,
    no_write: bool,
    quiet: bool,
) -> dict[str, object]:
    """``steer evaluate`` of a powder model: on ``data``, or on a test set of ``n`` spectra
    made now at ``seed`` (the model's spec)."""
    import json
    import tempfile

    from model_server.inversion.powder.evaluation import evaluate_powder_model

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from simulations.fcdb.powder_dataset import PowderSpec, generate_powder_dataset

            meta = json.loads((model / "model.json").read_text())
            data = Path(tmp) / "test.h5"
            generate_powder_dataset(
                PowderSpec.from_dict(meta["spec"]),
                n,
                data,
                seed=seed,
                progress=not quiet,
                command=command_line(),
            )
        return evaluate_powder_model(
            model,
            data,
            n_nmse=nmse_n,
            n_samples=samples,
            seed=seed,
            write=not no_write,
            progress=not quiet,
            command=command_line(),
        )


def _parse_list(spec: str, option: str, kind: Callable[[str], _Num], what: str) -> tuple[_Num, ...]:
    """The comma-separated ``what`` (``kind`` values) of ``option``; a usage error (exit 2)
    for anything else."""
    try:
        values = tuple(kind(x) for x in spec.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise typer.BadParameter(
            f"{spec!r}: give a comma-separated list of {what}", param_hint=option
        )
    return values


def evaluate_posterior_cmd(
    material: MaterialOpt = "Ge",
    model: ModelOpt = Path("models/ge"),
    truths: Annotated[
        int,
        typer.Option(
            "--truths",
            help="Force-constant sets: the named sets first, then draws from the training domain.",
        ),
    ] = 20,
    seed: SeedOpt = 0,
    orientations: Annotated[
        str,
        typer.Option(
            "--orientations",
            help="Levels: the first k orientations of the README run (0, 1, ..., 119 deg), "
            "comma-separated.",
        ),
    ] = "1,2,5,10,20,60,120",
    count_scales: Annotated[
        str,
        typer.Option(
            "--count-scales",
            help="Multiples of the README run's counts (200,000 events per orientation, "
            "a tenth of them background), comma-separated.",
        ),
    ] = "0.25,1,4",
    samples: SamplesOpt = 256,
    threads: ThreadsOpt = 2,
    binning: Annotated[
        str,
        typer.Option(
            "--binning",
            help="What the refinement fits: path (the folding tube around the q-path, the "
            "service's), wedge (every event of the zone, on the irreducible points of a "
            "Gamma-centred mesh; about 15x the counts) or classes (the path's bins split by "
            "the structure-factor class of each count's Brillouin zone: 4 for Ge). The "
            "VAE's start comes from the path's I(q, E) in every case.",
        ),
    ] = "path",
    wedge_mesh: WedgeMeshOpt = 16,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG: std and error against counts, VAE vs refined."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON result here.")] = None,
    records: Annotated[
        Path | None,
        typer.Option(
            "--records",
            help="Write every fit here, one JSON object a line (truth, level, converged, "
            "deviance/dof, z, error, std and Cramer-Rao std by name): what to read when a "
            "level's figures are carried by a few fits.",
        ),
    ] = None,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            "--merge",
            help="Run nothing: merge the JSON results (--out) of runs of one study at other "
            "levels (same material, truths, seed) and judge the targets over all their "
            "levels; give it once per file.",
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Calibration study of the likelihood refinement: Poisson replicas of the expected
    counts of many truths at every orientation count and count scale, started from the
    VAE; coverage, RMSE / Cramer-Rao bound, bias and std scaling."""
    import json

    from model_server.refinement.study import StudySettings, posterior_study

    if merge:
        _merge_studies(merge, out, plot, as_json)
        return

    settings = StudySettings(
        material=material,
        n_truths=truths,
        seed=seed,
        orientations=_parse_list(orientations, "--orientations", int, "integers"),
        count_scales=_parse_list(count_scales, "--count-scales", float, "numbers"),
        binning=binning,
        wedge_mesh=wedge_mesh,
    )
    settings.validate()  # before the models load: a bad value fails at once
    if threads < 1:
        raise typer.BadParameter(f"must be >= 1, got {threads}", param_hint="--threads")

    import numpy as np
    import torch
    from numpy.typing import NDArray
    from threadpoolctl import threadpool_limits

    from model_server.inversion.inference import Estimator
    from model_server.refinement.posterior_stats import FitRecord
    from steering.exceptions import SteeringError

    torch.set_num_threads(threads)
    estimator = Estimator(model, n_samples=samples)
    trained_on = str(estimator.model.meta.get("material", material))
    if trained_on != material:
        raise SteeringError(f"model {model} was trained on {trained_on}, not {material}")

    def start_fn(
        intensity: NDArray[np.float64], mask: NDArray[np.bool_]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """The VAE's means and stds by name: the refinement's start."""
        est = estimator.estimate(intensity, mask)
        names = est.fc_names
        return (
            {n: float(v) for n, v in zip(names, est.mean, strict=True)},
            {n: float(v) for n, v in zip(names, est.std, strict=True)},
        )

    fits: list[FitRecord] = []
    with threadpool_limits(limits=threads):
        result = posterior_study(settings, start_fn, progress=not quiet, records=fits)
    if records is not None:
        names = result["names"]
        records.write_text("".join(json.dumps(f.to_dict(names)) + "\n" for f in fits))
    result["model_version"] = estimator.model.version
    _write_study(result, out, plot, as_json)


def _write_study(
    result: dict[str, Any], out: Path | None, plot: Path | None, as_json: bool
) -> None:
    """A study's result with the command that made it: to ``out`` (JSON), ``plot`` (PNG)
    and stdout."""
    import json

    from model_server.refinement.posterior_stats import plot_study
    from simulations.jsonutil import json_default

    result["command"] = command_line()
    if out is not None:
        out.write_text(json.dumps(result, indent=1, default=json_default) + "\n")
    if plot is not None:
        plot_study(result, plot)
    emit(result, as_json)


def _merge_studies(files: list[Path], out: Path | None, plot: Path | None, as_json: bool) -> None:
    """``steer evaluate-posterior --merge``: one result of several runs' JSON results."""
    import json

    from model_server.refinement.posterior_stats import merge_results

    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(
                f"{f}: not a study result ({exc})", param_hint="--merge"
            ) from exc
    try:
        result = merge_results(results)
    except (KeyError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--merge") from exc
    _write_study(result, out, plot, as_json)


def _measured_spectra(files: list[Path], model: Path) -> tuple[object, str]:
    """(n, n_Q, n_E) spectra on ``model``'s crop from folded powder runs (``steer fold
    --out``) or measured-like sets, and a description of them."""
    import numpy as np

    from model_server.exceptions import TrainingError
    from model_server.inversion.powder.domain import read_measured_like
    from model_server.inversion.powder.inference import PowderEstimator

    est = PowderEstimator(model)
    qs, es = est.model.crop
    rows = []
    for f in files:
        try:
            ml = read_measured_like(f)
        except TrainingError:
            ml = None
        if ml is not None:
            rows += list(np.asarray(ml["spectra"], np.float32))
            continue
        from model_server.inversion.inference import read_folded

        data = read_folded(f)
        if data["grid_fingerprint"] != est.model.grid_fingerprint:
            raise TrainingError(f"{f} is not on the powder grid of {model}")
        spectrum = np.asarray(data["intensity"], np.float32)[qs, es]
        rows.append(np.where(np.asarray(data["mask"])[qs, es], spectrum, np.nan))
    if not rows:
        raise TrainingError("no measured spectra given (--measured)")
    return np.stack(rows), f"{len(rows)} spectra from {', '.join(str(f) for f in files)}"


def finetune_cmd(
    model: ModelOpt = Path("models/al_powder"),
    data: Annotated[
        Path,
        typer.Option("--data", help="The powder training set the model was trained on."),
    ] = Path("al_powder.h5"),
    out: Annotated[
        Path, typer.Option("--out", help="Model directory (or, --study, folder) to write.")
    ] = Path("models/al_powder_ft"),
    measured: Annotated[
        list[Path] | None,
        typer.Option(
            "--measured",
            help="Folded powder runs (steer fold --out) or measured-like sets to fine-tune on "
            "(repeat the option).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="'measured' (fine-tune on --measured) or 'extended' (train as long on the "
            "simulated set: the control).",
        ),
    ] = "measured",
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning passes.")] = 10,
    lr_factor: Annotated[
        float, typer.Option("--lr-factor", help="Learning rate as a share of the model's.")
    ] = 0.1,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            help="The domain-shift study: bias on measured-like spectra of the model, "
            "fine-tuned and extended (needs --test); JSON and a figure in --out.",
        ),
    ] = False,
    test: Annotated[
        Path | None, typer.Option("--test", help="--study: a fresh powder test set.")
    ] = None,
    n_finetune: Annotated[
        int, typer.Option("--n-finetune", help="--study: measured-like spectra to fine-tune on.")
    ] = 2000,
    n_test: Annotated[int, typer.Option("--n-test", help="--study: test sets reported.")] = 500,
    test_offset: Annotated[
        int, typer.Option("--test-offset", help="--study: first test set reported.")
    ] = 0,
    compare: Annotated[
        list[Path] | None,
        typer.Option(
            "--compare",
            help="--study: more model directories estimated on the same spectra (e.g. one "
            "trained with --measured-like); repeat the option.",
        ),
    ] = None,
    threads: ThreadsOpt = 1,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a powder model's autoencoder on unlabelled measured spectra at a reduced
    learning rate, then retrain its regressor on the simulated set (the powder-VAE paper's
    fix for the domain shift); or, with --study, measure the bias it removes."""
    import json

    import torch

    from model_server.inversion.powder.finetune import finetune_powder_model

    torch.set_num_threads(max(1, threads))
    if study:
        from model_server.inversion.powder.domain_study import domain_study, plot_domain_study

        if test is None:
            raise typer.BadParameter("the study needs a fresh test set", param_hint="--test")
        result = domain_study(
            model,
            data,
            test,
            out,
            n_finetune=n_finetune,
            n_test=n_test,
            test_offset=test_offset,
            epochs=epochs,
            lr_factor=lr_factor,
            compare={p.name: p for p in compare or []},
            progress=not quiet,
        )
        result["command"] = command_line()
        out.mkdir(parents=True, exist_ok=True)
        (out / "domain_study.json").write_text(json.dumps(result, indent=1) + "\n")
        result["figure"] = str(plot_domain_study(result, out / "domain_study.png"))
        emit(result, as_json)
        return
    spectra, source = (None, "") if mode == "extended" else _measured_spectra(measured or [], model)
    emit(
        finetune_powder_model(
            model,
            data,
            out,
            measured=spectra,  # type: ignore[arg-type]
            mode=mode,
            epochs=epochs,
            lr_factor=lr_factor,
            source=source,
            progress=not quiet,
            command=command_line(),
        ),
        as_json,
    )
