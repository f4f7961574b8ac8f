"""The path fold against the whole irreducible wedge (``make bench``): writes
bench-results/wedge.json.

On the README's Ge set-up (ARCS-like detector, Ei 80 meV, 5 K, omega 0..119 deg, the
``raman`` truth, 12,600 folded signal counts per orientation on the path and a tenth as
much background, the same scale and background amplitude for both binnings), one core:

* the Cramer-Rao bound of FC0-FC3 (``sqrt(diag(F^-1))``, the refinement's prior included)
  with the path binning (the 0.05 1/A tube around the q-path), with the irreducible
  points of a Gamma-centred 16^3 mesh (every Q within reach) and with the path's bins
  split by zone class (4 for Ge), at 1, 10 and 120 orientations
  (:func:`model_server.refinement.wedge.crb_comparison`, moments from every 4th pixel);
* what the wedge's moments cost per orientation against the path's, in the same process,
  every pixel and every 4th pixel.

The issue's rule: if the wedge is >= 2x tighter, it becomes the refinement's default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from consumers.reduction.folding import Folder
from consumers.reduction.moments import orientation_moments, star_operations
from consumers.reduction.table import FoldTable
from model_server.refinement.wedge import crb_comparison, wedge_grid
from tests.benchmarks.timing import best_of
from tests.ge_moments import ge_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def bench_wedge() -> None:
    run = ge_run()
    refiner = run.refiner
    grid, radius = wedge_grid(refiner, 16)
    table = FoldTable.cached(refiner.setup.crystal, grid, tolerance=radius)
    wedge = Folder(table, grid, refiner.instrument, run.folder.orientation, refiner.ei)
    out: dict[str, object] = {"material": "Ge", "threads": 1}
    with threadpool_limits(1):
        cost: dict[str, float] = {}
        for label, folder in (("path", run.folder), ("wedge", wedge)):
            ops = star_operations(folder, refiner.constants.operations)
            orientation_moments(folder, refiner.constants, 0.0, inverse_ops=ops)  # compile
            for stride in (1, 4):
                cost[f"{label}_stride{stride}_s"] = round(
                    best_of(
                        lambda f=folder, o=ops, s=stride: orientation_moments(
                            f, refiner.constants, 3.0, inverse_ops=o, pixel_stride=s
                        ),
                        repeats=1,
                    ),
                    3,
                )
        out["moments_one_orientation"] = cost
        out["wedge_over_path_moment_cost"] = round(
            cost["wedge_stride1_s"] / cost["path_stride1_s"], 2
        )
        crb = crb_comparison(
            refiner,
            run.folder.orientation,
            run.truth,
            list(np.arange(120.0)),
            [1, 10, 120],
            pixel_stride=4,
        )
    out["crb"] = crb
    tightest = {
        row["orientations"]: min(1.0 / v for v in row["wedge_over_path"].values())
        for row in crb["levels"]
    }
    out["wedge_tighter_by_at_least"] = {str(k): round(v, 2) for k, v in tightest.items()}
    first, last = crb["levels"][0], crb["levels"][-1]
    out["classes_tighter_by_at_least"] = {
        str(row["orientations"]): round(min(1.0 / v for v in row["classes_over_path"].values()), 2)
        for row in crb["levels"]
    }
    out["std_ratio_120_over_1"] = {
        label: {n: round(last[label][n] / first[label][n], 4) for n in crb["names"]}
        for label in ("path", "wedge", "classes")
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wedge.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    assert all(v > 1.0 for v in tightest.values())
