"""Reference ensemble, named FC sets, sensitivity selection and training domain."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.exceptions import InvalidCoefficientsError, UnknownFCSetError
from simulations.fcdb.reference import (
    gamma_optical_thz,
    load_reference,
    named_fc_set,
    resolve_fc,
    training_domain,
)
from simulations.lattice.materials import MaterialSetup


@pytest.mark.parametrize("material", ["Ge", "Nb", "Al"])
def test_reference_ensemble_is_consistent(material: str, request: pytest.FixtureRequest) -> None:
    ms: MaterialSetup = request.getfixturevalue(material.lower())
    ref = load_reference(material)
    assert ref.names == ms.basis.names
    assert len(ref.models) >= 3, "an ensemble needs several force fields"
    assert len(ref.kept) == 8
    assert set(ref.kept) <= set(ref.names)
    assert np.all(ref.domain[:, 0] < ref.domain[:, 1])
    # the kept ones are the 8 most sensitive
    ranked = sorted(ref.sensitivity, key=ref.sensitivity.__getitem__, reverse=True)
    assert list(ref.kept) == ranked[:8]
    # every model's own FCs lie in the domain (it is built around them)
    for coeffs in ref.models.values():
        assert ref.in_domain(coeffs).all()


def test_ge_raman_set_hits_the_raman_line_and_lies_in_the_domain(ge: MaterialSetup) -> None:
    raman = named_fc_set("Ge", "raman", ge)
    assert gamma_optical_thz(ge.basis, raman) == pytest.approx(9.0, rel=0.01)
    assert load_reference("Ge").in_domain(raman).all()


def test_ml_force_fields_are_too_soft_for_ge(ge: MaterialSetup) -> None:
    """The seed paper's premise: uMLFF zone-centre optical mode 4.5-7 THz vs 9.0 measured."""
    nu = gamma_optical_thz(ge.basis, named_fc_set("Ge", "mlff_mean", ge))
    assert 4.0 < nu < 8.0


def test_unknown_fc_set_lists_the_known_ones() -> None:
    with pytest.raises(
        UnknownFCSetError, match=r"unknown FC set 'nope' for Ge; known sets: mlff_mean"
    ):
        named_fc_set("Ge", "nope")
    with pytest.raises(UnknownFCSetError, match="raman"):  # Nb has no Raman-scaled set
        named_fc_set("Nb", "raman")


def test_resolve_fc_mapping(ge: MaterialSetup) -> None:
    label, coeffs = resolve_fc("Ge", {"1NN_xx": -3.0}, ge)
    assert label == "custom"
    assert coeffs[ge.basis.index("1NN_xx")] == -3.0
    mean = named_fc_set("Ge", "mlff_mean", ge)
    assert coeffs[1] == mean[1]
    with pytest.raises(InvalidCoefficientsError, match="unknown force-constant names"):
        resolve_fc("Ge", {"9NN_xx": 1.0}, ge)
    with pytest.raises(InvalidCoefficientsError, match="non-finite"):
        resolve_fc("Ge", {"1NN_xx": float("nan")}, ge)


def test_training_domain_rule() -> None:
    # same sign: -25 % below the smallest magnitude, +150 % above the largest
    np.testing.assert_allclose(training_domain(np.array([-2.0, -3.0])), [-7.5, -1.5])
    np.testing.assert_allclose(training_domain(np.array([1.0, 2.0])), [0.75, 5.0])
    # mixed signs: spans zero
    np.testing.assert_allclose(training_domain(np.array([-0.1, 0.2])), [-0.25, 0.5])
