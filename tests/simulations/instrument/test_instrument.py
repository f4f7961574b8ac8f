"""Spectrometer geometry, kinematics and UB (simulations.instrument.spectrometer).

Reference numbers in the hand-computed cases come from CODATA 2018 (via scipy.constants):
hbar^2 / (2 m_n) = 2.07212485 meV A^2 and v = 437.393362 m/s * sqrt(E / meV). They are typed
in as numbers, not taken from the module under test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import constants as sc

from simulations import Crystal, load_crystal
from simulations.exceptions import InstrumentError
from simulations.instrument.spectrometer import (
    Instrument,
    Orientation,
    busing_levy_b,
    energy_to_k,
    energy_to_speed,
)
from simulations.units import E_PER_K2

#: hbar^2 / (2 m_n) in meV A^2 (CODATA 2018).
HBAR2_2MN = 2.07212485
#: neutron speed in m/s per sqrt(meV) (CODATA 2018).
V_PER_SQRT_MEV = 437.393362
#: Ge conventional cubic lattice parameter of the shipped structure, Angstrom.
A_GE = 5.658


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcs() -> Instrument:
    return Instrument.arcs_like()


@pytest.fixture(scope="module")
def small() -> Instrument:
    return Instrument.arcs_like(n_columns=40, n_rows=16)


@pytest.fixture(scope="module")
def ge_orientation() -> Orientation:
    return Orientation.from_vectors(load_crystal("Ge"), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


@pytest.fixture
def table_with_solid_angles(small: Instrument, tmp_path: Path) -> Instrument:
    path = tmp_path / "pixels.csv"
    small.write_pixel_table(path)
    return Instrument.from_pixel_table(path)


@pytest.fixture
def table_without_solid_angles(small: Instrument, tmp_path: Path) -> Instrument:
    """The small array's pixels in shuffled order with ids offset by 5000, no solid angles."""
    perm = np.random.default_rng(3).permutation(small.n_pixels)
    path = tmp_path / "pixels_no_sa.csv"
    table = np.column_stack([small.pixel_ids[perm] + 5000, small.positions[perm]])
    np.savetxt(path, table, delimiter=",", header="id,x,y,z", comments="", fmt="%.12g")
    return Instrument.from_pixel_table(path)


def _speed(energy: np.ndarray | float) -> np.ndarray:
    """Neutron speed (m/s) at ``energy`` meV from E = m v^2 / 2 (scipy's CODATA constants)."""
    return np.sqrt(2 * np.asarray(energy) * sc.milli * sc.electron_volt / sc.neutron_mass)


def _tof_ns(ins: Instrument, idx: np.ndarray, energy: np.ndarray, ei: float) -> np.ndarray:
    """Time of flight by hand: L1 / v_i + L2 / v_f."""
    l2 = np.linalg.norm(ins.positions[idx], axis=1)
    return (ins.l1 / _speed(ei) + l2 / _speed(ei - energy)) * 1e9


# -- round trips --------------------------------------------------------------------------------


def _check_round_trip(ins: Instrument, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ei = 80.0
    n = 10_000
    idx = rng.integers(0, ins.n_pixels, n)
    energy = rng.uniform(-60.0, 75.0, n)  # energy gain and loss, E_f from 5 to 140 meV
    assert (energy < 0).sum() > 1000
    assert (energy > 0).sum() > 1000
    tof = _tof_ns(ins, idx, energy, ei)

    q, e = ins.event_to_qe(idx, tof, ei)
    assert q.shape == (n, 3)
    assert_allclose(e, energy, rtol=0, atol=1e-9)

    idx_back, tof_back = ins.qe_to_event(q, e, ei)
    assert_array_equal(idx_back, idx)
    assert_allclose(tof_back, tof, rtol=1e-9)


def test_round_trip_regular_array(arcs: Instrument) -> None:
    _check_round_trip(arcs, seed=11)


def test_round_trip_loaded_pixel_table(table_with_solid_angles: Instrument) -> None:
    ins = table_with_solid_angles
    assert not ins.layout  # the loaded table goes through the nearest-direction lookup
    _check_round_trip(ins, seed=12)


def test_round_trip_pixel_table_without_solid_angles(
    table_without_solid_angles: Instrument,
) -> None:
    _check_round_trip(table_without_solid_angles, seed=13)


def test_pixel_table_round_trip_keeps_geometry(
    small: Instrument, table_with_solid_angles: Instrument
) -> None:
    ins = table_with_solid_angles
    assert_array_equal(ins.pixel_ids, small.pixel_ids)
    assert_allclose(ins.positions, small.positions, rtol=1e-8, atol=1e-9)  # written as %.9g
    assert_allclose(ins.solid_angles, small.solid_angles, rtol=1e-8)


def test_pixel_table_without_solid_angles_estimates_them(
    small: Instrument, table_without_solid_angles: Instrument
) -> None:
    sa = table_without_solid_angles.solid_angles
    assert np.all(np.isfinite(sa))
    assert np.all(sa > 0)
    # d^2 / r^2 with d the nearest-neighbour distance: pixels here are 0.213 m x 0.199 m,
    # so the square estimate is ~7% low; allow 15%
    assert_allclose(sa.sum(), small.solid_angles.sum(), rtol=0.15)


def test_pixel_table_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,x,z\n0,1.0,2.0\n")
    with pytest.raises(InstrumentError, match=r"lacks columns \['y'\]"):
        Instrument.from_pixel_table(bad)
    with pytest.raises(InstrumentError, match="cannot read pixel table"):
        Instrument.from_pixel_table(tmp_path / "missing.csv")


# -- hand-computed kinematics -------------------------------------------------------------------


def test_elastic_event_at_90_degrees() -> None:
    # three columns at 30, 90 and 150 deg in plane, one row at y = 0: pixel 1 sits at
    # (3, 0, 0) m, scattering angle 90 deg towards +x
    ins = Instrument.arcs_like(n_columns=3, n_rows=1, phi_min=0.0, phi_max=180.0, radius=3.0)
    assert_allclose(ins.positions[1], [3.0, 0.0, 0.0], atol=1e-12)
    ei = 80.0
    k_i = np.sqrt(80.0 / HBAR2_2MN)  # 6.21359 1/A
    v = V_PER_SQRT_MEV * np.sqrt(80.0)  # 3912.16 m/s
    tof = (13.6 + 3.0) / v * 1e9  # 4.2431747e6 ns
    assert_allclose(tof, 4.2431747e6, rtol=1e-7)

    q, e = ins.event_to_qe(np.array([1]), np.array([tof]), ei)
    # k_f = k_i along +x, so Q = k_i z - k_i x
    assert_allclose(e, [0.0], atol=1e-6)
    assert_allclose(q[0], [-k_i, 0.0, k_i], rtol=1e-7, atol=1e-6)
    assert_allclose(np.linalg.norm(q[0]), np.sqrt(2.0) * k_i, rtol=1e-7)

    idx, tof_back = ins.qe_to_event(q, e, ei)
    assert idx.tolist() == [1]
    assert_allclose(tof_back, [tof], rtol=1e-9)


def test_inelastic_event_forward() -> None:
    # columns at -60, 0, 60 deg: pixel 1 sits on the beam axis at (0, 0, 3) m
    ins = Instrument.arcs_like(n_columns=3, n_rows=1, phi_min=-90.0, phi_max=90.0, radius=3.0)
    ei, e_transfer = 80.0, 30.0
    k_i = np.sqrt(80.0 / HBAR2_2MN)  # 6.21359 1/A
    k_f = np.sqrt(50.0 / HBAR2_2MN)  # 4.91224 1/A
    tof = (13.6 / (V_PER_SQRT_MEV * np.sqrt(80.0)) + 3.0 / (V_PER_SQRT_MEV * np.sqrt(50.0))) * 1e9

    q, e = ins.event_to_qe(np.array([1]), np.array([tof]), ei)
    assert_allclose(e, [e_transfer], rtol=1e-7)
    assert_allclose(q[0], [0.0, 0.0, k_i - k_f], rtol=1e-7, atol=1e-9)
    assert_allclose(q[0, 2], 1.301299, rtol=1e-6)


def test_energy_and_momentum_conservation_random_events(arcs: Instrument) -> None:
    rng = np.random.default_rng(5)
    ei = 60.0
    idx = rng.integers(0, arcs.n_pixels, 2000)
    # flight times of neutrons with E_f between 0.1 and 1.5 E_i (energy loss and gain)
    t_fast = _tof_ns(arcs, idx, np.full(len(idx), -0.5 * ei), ei)
    t_slow = _tof_ns(arcs, idx, np.full(len(idx), 0.9 * ei), ei)
    tof = t_fast + (t_slow - t_fast) * rng.random(len(idx))
    q, e = arcs.event_to_qe(idx, tof, ei)
    assert np.all(np.isfinite(e))

    # k_f from the flight time to the pixel, by hand: v_f = L2 / (t - L1 / v_i)
    l2 = np.linalg.norm(arcs.positions[idx], axis=1)
    v_f = l2 / (tof * 1e-9 - arcs.l1 / (V_PER_SQRT_MEV * np.sqrt(ei)))
    e_f = (v_f / V_PER_SQRT_MEV) ** 2
    k_f_len = np.sqrt(e_f / HBAR2_2MN)
    k_f = k_f_len[:, None] * arcs.positions[idx] / l2[:, None]
    k_i = np.array([0.0, 0.0, np.sqrt(ei / HBAR2_2MN)])

    assert_allclose(q, k_i - k_f, rtol=1e-6, atol=1e-6)  # Q = k_i - k_f
    # E = hbar^2 (k_i^2 - k_f^2) / 2 m_n with k_f = k_i - Q from the returned Q
    k_f_from_q = k_i - q
    assert_allclose(e, HBAR2_2MN * (k_i @ k_i - np.sum(k_f_from_q**2, axis=1)), atol=1e-5)


def test_constants_match_codata() -> None:
    assert_allclose(E_PER_K2, HBAR2_2MN, rtol=1e-7)
    assert_allclose(energy_to_speed(80.0), V_PER_SQRT_MEV * np.sqrt(80.0), rtol=1e-7)
    assert_allclose(energy_to_k(80.0), np.sqrt(80.0 / HBAR2_2MN), rtol=1e-7)


def test_events_before_elastic_limit_and_missed_pixels(arcs: Instrument) -> None:
    ei = 80.0
    t_i = arcs.l1 / (V_PER_SQRT_MEV * np.sqrt(ei)) * 1e9
    _, e = arcs.event_to_qe(np.array([0, 1]), np.array([0.9 * t_i, 0.999 * t_i]), ei)
    assert np.all(np.isnan(e))  # tof <= L1 / v_i cannot be a neutron
    # k_f at -90 deg (towards -x) misses the array (-28..135 deg): index -1, tof NaN
    k = np.sqrt(ei / HBAR2_2MN)
    idx, tof = arcs.qe_to_event(np.array([[k, 0.0, k]]), np.array([0.0]), ei)
    assert idx.tolist() == [-1]
    assert np.isnan(tof[0])


# -- UB -----------------------------------------------------------------------------------------


def _r_y(deg: float) -> np.ndarray:
    w = np.deg2rad(deg)
    return np.array([[np.cos(w), 0, np.sin(w)], [0, 1, 0], [-np.sin(w), 0, np.cos(w)]])


def _conventional_to_primitive_rlu(crystal: Crystal, hkl: list[int]) -> np.ndarray:
    """Primitive r.l.u. of conventional ``hkl``: q_i = a_i . G / (2 pi)."""
    g = np.asarray(hkl, float) @ (2 * np.pi * np.linalg.inv(crystal.conventional_lattice).T)
    return crystal.lattice @ g / (2 * np.pi)


def test_ub_cubic_axes_at_omega_zero_and_90(ge_orientation: Orientation) -> None:
    crystal = ge_orientation.crystal
    assert_allclose(np.linalg.norm(crystal.conventional_lattice, axis=1), A_GE, rtol=1e-9)
    q_len = 2 * 2 * np.pi / A_GE  # |(2,0,0)| = 2 * 2 pi / a = 2.22086 1/A
    h200 = _conventional_to_primitive_rlu(crystal, [2, 0, 0])
    h020 = _conventional_to_primitive_rlu(crystal, [0, 2, 0])
    h002 = _conventional_to_primitive_rlu(crystal, [0, 0, 2])
    # u = (1,0,0) along the beam (+z), v = (0,1,0) in plane on the +x side, so w is up (+y)
    assert_allclose(ge_orientation.rlu_to_lab(h200, 0.0)[0], [0, 0, q_len], atol=1e-10)
    assert_allclose(ge_orientation.rlu_to_lab(h020, 0.0)[0], [q_len, 0, 0], atol=1e-10)
    assert_allclose(ge_orientation.rlu_to_lab(h002, 0.0)[0], [0, q_len, 0], atol=1e-10)
    # omega = +90 deg about +y: R_y(90) takes +z to +x and +x to -z
    assert_allclose(ge_orientation.rlu_to_lab(h200, 90.0)[0], [q_len, 0, 0], atol=1e-10)
    assert_allclose(ge_orientation.rlu_to_lab(h020, 90.0)[0], [0, 0, -q_len], atol=1e-10)
    for omega in (-37.0, 12.5, 90.0):
        assert_allclose(
            ge_orientation.rlu_to_lab(h200, omega)[0],
            _r_y(omega) @ [0, 0, q_len],
            atol=1e-10,
        )
    # UB itself: Q_sample = 2 pi UB h
    assert_allclose(2 * np.pi * ge_orientation.ub @ [2, 0, 0], [0, 0, q_len], atol=1e-10)


def test_ub_v_on_plus_x_side() -> None:
    o = Orientation.from_vectors(load_crystal("Ge"), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0))
    q = 2 * np.pi * o.ub @ [1.0, 1.0, 0.0]
    assert q[0] > 0
    assert abs(q[1]) < 1e-12
    q_u = 2 * np.pi * o.ub @ [1.0, 0.0, 0.0]
    assert_allclose(q_u / np.linalg.norm(q_u), [0, 0, 1], atol=1e-12)


def test_lab_and_rlu_agree_on_length_for_random_q(ge_orientation: Orientation) -> None:
    rng = np.random.default_rng(21)
    recip = ge_orientation.crystal.reciprocal_lattice  # rows b_i with 2 pi
    for omega in rng.uniform(-180, 180, 8):
        q_rlu = rng.uniform(-3, 3, (50, 3))
        q_lab = ge_orientation.rlu_to_lab(q_rlu, omega)
        assert_allclose(
            np.linalg.norm(q_lab, axis=1), np.linalg.norm(q_rlu @ recip, axis=1), rtol=1e-12
        )
        assert_allclose(ge_orientation.lab_to_rlu(q_lab, omega), q_rlu, atol=1e-12)


def test_busing_levy_b_hexagonal() -> None:
    a, c = 3.0, 5.0
    lat = np.array([[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, c]])
    b = busing_levy_b(lat)
    # reciprocal metric by hand: a* = 2 / (a sqrt 3), c* = 1 / c, gamma* = 60 deg
    a_star, c_star = 2 / (a * np.sqrt(3)), 1 / c
    metric = np.array(
        [
            [a_star**2, a_star**2 * 0.5, 0],
            [a_star**2 * 0.5, a_star**2, 0],
            [0, 0, c_star**2],
        ]
    )
    assert_allclose(b.T @ b, metric, atol=1e-14)
    assert_allclose(np.tril(b, -1), 0, atol=1e-15)  # upper triangular


def test_busing_levy_b_triclinic() -> None:
    lat = np.array([[4.0, 0.0, 0.0], [0.7, 5.1, 0.0], [-0.9, 1.3, 6.2]])
    b = busing_levy_b(lat)
    rec = np.linalg.inv(lat).T  # rows a*, b*, c* without 2 pi
    assert_allclose(b.T @ b, rec @ rec.T, atol=1e-14)
    assert_allclose(np.tril(b, -1), 0, atol=1e-15)


def test_parallel_orientation_vectors_raise() -> None:
    with pytest.raises(InstrumentError, match="parallel"):
        Orientation.from_vectors(load_crystal("Ge"), (1.0, 0.0, 0.0), (2.0, 0.0, 0.0))


# -- solid angles, limits, ids ------------------------------------------------------------------


def test_solid_angle_total_matches_cylinder_integral(arcs: Instrument) -> None:
    total = arcs.solid_angles.sum()
    assert 2.0 < total < 3.2
    # cylinder radius R, height +-H: integral over y of R^2 / (R^2 + y^2)^(3/2) dy
    # = 2 H / sqrt(R^2 + H^2), times the angle span; here H = R tan(28 deg), so 2 sin(28 deg)
    radius = 3.0
    height = radius * np.tan(np.deg2rad(28.0))
    d_phi = np.deg2rad(135.0 - (-28.0))
    analytic = d_phi * 2 * height / np.sqrt(radius**2 + height**2)
    assert_allclose(analytic, d_phi * 2 * np.sin(np.deg2rad(28.0)), rtol=1e-12)
    assert_allclose(total, analytic, rtol=1e-3)  # 2.671 sr


def test_check_omegas_limits() -> None:
    ins = Instrument.arcs_like(n_columns=2, n_rows=2, goniometer_limits=(-10.0, 100.0))
    assert_array_equal(ins.check_omegas(np.array([0, 50, 100], dtype=float)), [0.0, 50.0, 100.0])
    with pytest.raises(InstrumentError, match=r"outside the goniometer limits -10\.\.100 deg"):
        ins.check_omegas(np.array([0.0, 120.0], dtype=float))
    with pytest.raises(InstrumentError, match="goniometer limits"):
        ins.check_omegas(np.array([-11.0], dtype=float))
    with pytest.raises(InstrumentError, match="goniometer limits"):
        ins.check_omegas(np.array([np.nan], dtype=float))
    with pytest.raises(InstrumentError, match="no orientations"):
        ins.check_omegas(np.array([], dtype=float))


def test_index_of(arcs: Instrument, table_without_solid_angles: Instrument) -> None:
    assert_array_equal(arcs.index_of(np.array([0, 5, 102399])), [0, 5, 102399])
    with pytest.raises(InstrumentError, match=r"unknown pixel ids \[102400\]"):
        arcs.index_of(np.array([0, 102400]))
    with pytest.raises(InstrumentError, match=r"unknown pixel ids \[-1\]"):
        arcs.index_of(np.array([-1]))

    ins = table_without_solid_angles  # shuffled ids 5000..5639
    ids = ins.pixel_ids[[7, 3, 600]]
    assert_array_equal(ins.index_of(ids), [7, 3, 600])
    with pytest.raises(InstrumentError, match=r"unknown pixel ids \[12\]"):
        ins.index_of(np.array([5001, 12]))


def test_arcs_like_layout_and_ids(arcs: Instrument) -> None:
    assert arcs.n_pixels == 400 * 256
    # pixel id = column * n_rows + row: column 0 is at phi_min side, row 0 at the bottom
    p = arcs.positions
    assert p[0, 1] < 0
    assert p[255, 1] > 0
    assert abs(p[0, 0] - p[255, 0]) < 1e-12
    assert np.arctan2(p[256, 0], p[256, 2]) > np.arctan2(p[0, 0], p[0, 2])
    with pytest.raises(InstrumentError, match="phi_max > phi_min"):
        Instrument.arcs_like(phi_min=10.0, phi_max=10.0)


def test_metadata_rebuilds_regular_array(small: Instrument) -> None:
    again = Instrument.from_metadata(small.to_metadata())
    assert_allclose(again.positions, small.positions)
    loaded = dataclasses.replace(small, layout={})
    with pytest.raises(InstrumentError, match="pixel table"):
        Instrument.from_metadata(loaded.to_metadata())
