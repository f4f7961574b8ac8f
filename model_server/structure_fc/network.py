"""The equivariant network of the structure -> force-constant model (torch + e3nn).

Architecture (a NequIP-like message-passing network with a bond head):

1. **Embedding.** Each atom's species (an index into the known elements) -> ``n_scalar``
   scalars (``0e``): an MLP of physical element features (period, group, covalent radius,
   electronegativity, log Z; :func:`element_features`) plus a free per-species vector that
   starts at zero (or the free vector alone for a model without features).
2. **Interactions** (``n_layers`` of them). For every directed bond ``e = (i -> j)`` with
   vector ``r`` (Angstrom): spherical harmonics ``Y^l(r/|r|)``, ``l <= lmax``, and a Bessel
   radial basis of ``|r|`` with a smooth polynomial cutoff envelope. The message to ``i`` is
   the tensor product ``h_j (x) Y(r)`` (e3nn ``uvu`` paths) weighted per bond by an MLP of the
   radial basis; messages are summed over neighbours (scaled by 1/sqrt(average neighbour
   count)), mixed by a linear layer, added to a linear self-interaction and passed through
   an e3nn ``Gate`` (SiLU on even scalars, tanh on odd ones, sigmoid gates on ``l > 0``).
   Hidden features: ``n_scalar x 0e + n_pseudo x 0o + n_vector x (1o + 1e) + n_tensor x (2e + 2o)``.
3. **Bond head.** For bond ``e = (i -> j)``: ``a_i (x) b_j`` (a fully connected tensor product
   of two linear projections of the end atoms' features), then ``(x) Y(r)`` with weights from
   a radial MLP (zero at the cutoff), then a linear map to ``0e + 1e + 2e``: 9 numbers that
   are the isotropic, antisymmetric and symmetric-traceless parts of a 3x3 Cartesian tensor
   (e3nn ``ReducedTensorProducts('ij', i='1o', j='1o')`` change of basis). Added to it, a
   direct invariant path: an MLP of both atoms' scalar features and the radial basis gives
   ``alpha I + beta (u u^T - I/3)`` (``u = r/|r|``; the central-force-like part, easy to
   learn), times the envelope. The sum is multiplied by a fixed scale (eV/A^2).
4. **Constraints** (:func:`constrain`), exact by construction:

   * pair symmetry ``Phi(i0, jR) = Phi(j0, i(-R))^T``: each bond's tensor is averaged with the
     transpose of its reverse's;
   * a symmetric self term with the acoustic sum rule: the antisymmetric parts (pseudovectors)
     of the bonds leaving each atom must sum to zero, so the minimal-norm correction
     ``A_e -> A_e - (X_i - X_j)`` with ``L X = div A`` (``L`` the graph Laplacian of the cell)
     is applied (zero for any atom whose site symmetry already forbids a net pseudovector);
   * self terms ``Phi(i0, i0) = -sum_{bonds of i} Phi(i0, jR)``.

All operations are equivariant under rotations (and inversion) of the input, so a structure's
predicted force constants carry its space-group symmetry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from numpy.typing import NDArray
from torch import Tensor, nn

from model_server.structure_fc.graph import PeriodicGraph

__all__ = ["FCNet", "GraphBatch", "NetConfig", "collate", "constrain", "element_features"]

#: What :func:`element_features` gives per element (scaled to about 0..1).
ELEMENT_FEATURES = (
    "period / 7",
    "group / 18 (f-block: 3 / 18)",
    "covalent radius / 2 A (ASE)",
    "Pauling electronegativity / 4 (pymatgen; 0 where undefined)",
    "log(Z) / log(118)",
)


def element_features(z: int) -> tuple[float, ...]:
    """Physical descriptors of an element for the species embedding (see ELEMENT_FEATURES)."""
    import warnings

    from ase.data import covalent_radii
    from pymatgen.core import Element

    el = Element.from_Z(int(z))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = float(el.X)
    group = el.group if 1 <= el.group <= 18 else 3
    return (
        round(el.row / 7.0, 6),
        round(group / 18.0, 6),
        round(float(covalent_radii[int(z)]) / 2.0, 6),
        round(x / 4.0 if math.isfinite(x) else 0.0, 6),
        round(math.log(int(z)) / math.log(118.0), 6),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NetConfig:
    """Hyper-parameters of :class:`FCNet` (stored in the artifact's model.json).

    Attributes
    ----------
    species
        Atomic numbers with an embedding, ascending.
    cutoff
        Bond cutoff of the graph and of the predicted force constants, Angstrom.
    n_layers
        Interaction layers.
    n_scalar, n_pseudo, n_vector, n_tensor
        Channels of 0e, 0o, 1o+1e, 2e+2o hidden features.
    lmax
        Largest spherical-harmonic degree of the bond directions.
    n_radial
        Bessel radial basis functions.
    radial_hidden
        Width of the radial MLPs.
    avg_neighbours
        Average number of bonds per atom in training (normalises the message sums).
    fc_scale
        Output scale, eV/A^2 (RMS of the training bond tensors).
    species_features
        Per species, :func:`element_features` (stored, so that the model does not depend on
        the tables' versions); empty: a free embedding per species only.
    """

    species: tuple[int, ...]
    cutoff: float = 6.0
    n_layers: int = 3
    n_scalar: int = 32
    n_pseudo: int = 8
    n_vector: int = 8
    n_tensor: int = 6
    lmax: int = 2
    n_radial: int = 8
    radial_hidden: int = 32
    avg_neighbours: float = 50.0
    fc_scale: float = 1.0
    species_features: tuple[tuple[float, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["species"] = list(self.species)
        d["species_features"] = [list(f) for f in self.species_features]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_json`."""
        d = dict(data)
        d["species"] = tuple(int(z) for z in d["species"])
        d["species_features"] = tuple(
            tuple(float(v) for v in f) for f in d.get("species_features", ())
        )
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphBatch:
    """Several crystals' graphs as one disconnected graph (torch tensors).

    Attributes
    ----------
    species
        (N,) long, index into :attr:`NetConfig.species` of every atom.
    src, dst
        (E,) long, global atom index of each directed bond's start ``i`` and end ``j``.
    vectors
        (E, 3) float, Angstrom, bond vectors ``r_j + R - r_i``.
    reverse
        (E,) long, global index of each bond's reverse.
    crystal
        (N,) long, which crystal (0..n_crystals-1) each atom belongs to.
    component
        (N,) long, which connected part of the bond graph each atom belongs to (numbered
        across the batch; one per crystal unless a cell's graph falls apart).
    n_crystals
        Number of crystals.
    edge_offsets, atom_offsets
        (n_crystals + 1,) int, where each crystal's bonds and atoms start.
    """

    species: Tensor
    src: Tensor
    dst: Tensor
    vectors: Tensor
    reverse: Tensor
    crystal: Tensor
    component: Tensor
    n_crystals: int
    edge_offsets: NDArray[np.int64]
    atom_offsets: NDArray[np.int64]

    @property
    def n_atoms(self) -> int:
        """Total number of atoms."""
        return int(self.species.shape[0])


def collate(
    graphs: Sequence[PeriodicGraph],
    species_index: dict[int, int],
    dtype: torch.dtype = torch.float32,
) -> GraphBatch:
    """Stack graphs into one :class:`GraphBatch` (species must be known: checked earlier)."""
    species, src, dst, vec, rev, cry, comp = [], [], [], [], [], [], []
    a_off, e_off = [0], [0]
    n_comp = 0
    for k, g in enumerate(graphs):
        base_a, base_e = a_off[-1], e_off[-1]
        species.append(np.array([species_index[int(z)] for z in g.numbers], dtype=np.int64))
        src.append(g.pairs[:, 0] + base_a)
        dst.append(g.pairs[:, 1] + base_a)
        vec.append(g.vectors)
        rev.append(g.reverse + base_e)
        cry.append(np.full(g.n_atoms, k, dtype=np.int64))
        comp.append(g.component + n_comp)
        n_comp += int(g.component.max()) + 1
        a_off.append(base_a + g.n_atoms)
        e_off.append(base_e + len(g.pairs))
    return GraphBatch(
        species=torch.from_numpy(np.concatenate(species)),
        src=torch.from_numpy(np.concatenate(src)),
        dst=torch.from_numpy(np.concatenate(dst)),
        vectors=torch.from_numpy(np.concatenate(vec)).to(dtype),
        reverse=torch.from_numpy(np.concatenate(rev)),
        crystal=torch.from_numpy(np.concatenate(cry)),
        component=torch.from_numpy(np.concatenate(comp)),
        n_crystals=len(graphs),
        edge_offsets=np.array(e_off, dtype=np.int64),
        atom_offsets=np.array(a_off, dtype=np.int64),
    )


def _bessel(r: Tensor, cutoff: float, n: int) -> Tensor:
    """(E, n) Bessel radial basis sqrt(2/c) sin(k pi r / c) / r."""
    k = torch.arange(1, n + 1, dtype=r.dtype, device=r.device)
    return math.sqrt(2.0 / cutoff) * torch.sin(k * math.pi * r[:, None] / cutoff) / r[:, None]


def _envelope(r: Tensor, cutoff: float) -> Tensor:
    """(E,) smooth cutoff 1 - 28 x^6 + 48 x^7 - 21 x^8 (value, slope, curvature 0 at x = 1)."""
    x = torch.clamp(r / cutoff, max=1.0)
    return 1.0 - 28.0 * x**6 + 48.0 * x**7 - 21.0 * x**8


def _uvu_tensor_product(
    irreps_in: o3.Irreps, irreps_sh: o3.Irreps, wanted: o3.Irreps
) -> tuple[o3.TensorProduct, o3.Irreps]:
    """Depthwise tensor product ``irreps_in (x) irreps_sh`` keeping outputs in ``wanted``."""
    wanted_irs = {ir for _, ir in wanted}
    mid: list[tuple[int, o3.Irrep]] = []
    instructions = []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted_irs:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    irreps_mid = o3.Irreps(mid)
    irreps_sorted, perm, _ = irreps_mid.sort()
    instructions = [(i, j, perm[k], m, t) for i, j, k, m, t in instructions]
    tp = o3.TensorProduct(
        irreps_in,
        irreps_sh,
        irreps_sorted,
        instructions,
        shared_weights=False,
        internal_weights=False,
    )
    return tp, irreps_sorted.simplify()


class _Interaction(nn.Module):
    """One message-passing layer (see the module docstring)."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_sh: o3.Irreps,
        config: NetConfig,
    ) -> None:
        super().__init__()
        scalars = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l > 0])
        gates = o3.Irreps([(gated.num_irreps, "0e")])
        self.gate = e3nn_nn.Gate(
            scalars,
            [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars],
            gates,
            [torch.sigmoid],
            gated,
        )
        self.lin_in = o3.Linear(irreps_in, irreps_in)
        self.tp, irreps_mid = _uvu_tensor_product(irreps_in, irreps_sh, self.gate.irreps_in)
        self.radial = e3nn_nn.FullyConnectedNet(
            [config.n_radial, config.radial_hidden, config.radial_hidden, self.tp.weight_numel],
            torch.nn.functional.silu,
        )
        self.lin_msg = o3.Linear(self.tp.irreps_out, self.gate.irreps_in)
        self.lin_self = o3.Linear(irreps_in, self.gate.irreps_in)
        self.norm = 1.0 / math.sqrt(config.avg_neighbours)
        self.irreps_out = self.gate.irreps_out
        self.residual = irreps_in == self.irreps_out
        del irreps_mid

    def forward(
        self, h: Tensor, src: Tensor, dst: Tensor, sh: Tensor, radial: Tensor, env: Tensor
    ) -> Tensor:
        w = self.radial(radial) * env[:, None]
        msg = self.tp(self.lin_in(h)[dst], sh, w)
        agg = torch.zeros(h.shape[0], msg.shape[1], dtype=msg.dtype, device=msg.device)
        agg = agg.index_add(0, src, msg) * self.norm
        out = self.gate(self.lin_msg(agg) + self.lin_self(h))
        return out + h if self.residual else out


class FCNet(nn.Module):
    """Structure graph -> per-bond 3x3 force constants (eV/A^2) and self terms."""

    species_table: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.irreps_sh = o3.Irreps.spherical_harmonics(c.lmax)
        self.irreps_hidden = o3.Irreps(
            f"{c.n_scalar}x0e + {c.n_pseudo}x0o + {c.n_vector}x1o + {c.n_vector}x1e"
            f" + {c.n_tensor}x2e + {c.n_tensor}x2o"
        ).simplify()
        self.embed = nn.Embedding(len(c.species), c.n_scalar)
        self.embed_features: nn.Module | None = None
        if c.species_features:
            # Embedding = MLP(element features) + a free per-species part starting at zero, so
            # that rare elements borrow from chemically similar ones.
            feats = torch.tensor(c.species_features, dtype=torch.get_default_dtype())
            self.register_buffer("species_table", feats, persistent=False)
            self.embed_features = torch.nn.Sequential(
                torch.nn.Linear(feats.shape[1], c.n_scalar),
                torch.nn.SiLU(),
                torch.nn.Linear(c.n_scalar, c.n_scalar),
            )
            torch.nn.init.zeros_(self.embed.weight)
        irreps = o3.Irreps(f"{c.n_scalar}x0e")
        layers = []
        for _ in range(c.n_layers):
            layer = _Interaction(irreps, self.irreps_hidden, self.irreps_sh, c)
            layers.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(layers)
        self.irreps_node = irreps
        pair_in = o3.Irreps(
            f"{c.n_scalar // 2}x0e + {c.n_vector // 2}x1o + {c.n_vector // 2}x1e"
            f" + {c.n_tensor // 2}x2e"
        )
        pair_mid = o3.Irreps(
            f"{c.n_scalar // 2}x0e + {c.n_vector}x1o + {c.n_vector}x1e + {c.n_tensor}x2e"
            f" + {c.n_tensor}x2o"
        )
        self.proj_a = o3.Linear(irreps, pair_in)
        self.proj_b = o3.Linear(irreps, pair_in)
        self.pair_tp = o3.FullyConnectedTensorProduct(pair_in, pair_in, pair_mid)
        edge_out = o3.Irreps("4x0e + 4x1e + 4x2e")
        self.edge_tp = o3.FullyConnectedTensorProduct(
            pair_mid, self.irreps_sh, edge_out, shared_weights=False, internal_weights=False
        )
        self.edge_radial = e3nn_nn.FullyConnectedNet(
            [c.n_radial, c.radial_hidden, c.radial_hidden, self.edge_tp.weight_numel],
            torch.nn.functional.silu,
        )
        self.out = o3.Linear(edge_out, o3.Irreps("0e + 1e + 2e"))
        # Direct invariant path: an MLP of both atoms' scalars and the radial basis gives the
        # isotropic and the longitudinal (r r^T) parts of the bond tensor.
        self.direct = torch.nn.Sequential(
            torch.nn.Linear(2 * c.n_scalar + c.n_radial, c.radial_hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(c.radial_hidden, c.radial_hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(c.radial_hidden, 2),
        )
        rtp = o3.ReducedTensorProducts("ij", i="1o", j="1o")
        assert str(rtp.irreps_out) == "1x0e+1x1e+1x2e"
        self.register_buffer("change_of_basis", rtp.change_of_basis.clone())
        # The gate puts the even scalars first: the descriptors are h[:, :n_scalar].
        assert self.irreps_node[0] == (c.n_scalar, o3.Irrep("0e"))

    def node_features(self, batch: GraphBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-atom features after the interactions and the bonds' geometric inputs.

        Returns
        -------
        h
            (N, irreps_node.dim) features.
        sh
            (E, (lmax+1)^2) spherical harmonics of the bond directions.
        radial
            (E, n_radial) radial basis times the envelope.
        env
            (E,) envelope.
        """
        dtype = self.embed.weight.dtype
        vec = batch.vectors.to(dtype)
        r = torch.linalg.norm(vec, dim=1)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        env = _envelope(r, self.config.cutoff)
        radial = _bessel(r, self.config.cutoff, self.config.n_radial) * env[:, None]
        h = self.embed(batch.species).to(dtype)
        if self.embed_features is not None:
            h = h + self.embed_features(self.species_table[batch.species])
        for layer in self.layers:
            h = layer(h, batch.src, batch.dst, sh, radial, env)
        return h, sh, radial, env

    def descriptors(self, h: Tensor) -> Tensor:
        """(N, n_scalar) rotation-invariant per-atom descriptors (the even scalar features)."""
        return h[:, : self.config.n_scalar]

    def forward(self, batch: GraphBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Force constants of every bond and atom of a batch.

        Returns
        -------
        bond_fc
            (E, 3, 3), eV/A^2, ``Phi(i0, jR)`` of every directed bond (constrained).
        self_fc
            (N, 3, 3), eV/A^2, the self terms ``Phi(i0, i0)`` (acoustic sum rule).
        descriptors
            (N, n_descriptor) per-atom invariant features.
        """
        h, sh, radial, env = self.node_features(batch)
        a = self.proj_a(h)[batch.src]
        b = self.proj_b(h)[batch.dst]
        z = self.pair_tp(a, b)
        w = self.edge_radial(radial) * env[:, None]
        irr = self.out(self.edge_tp(z, sh, w))  # (E, 9)
        raw = torch.einsum("ek,kxy->exy", irr, self.change_of_basis)
        n = self.config.n_scalar
        ab = self.direct(torch.cat([h[batch.src, :n], h[batch.dst, :n], radial], dim=1))
        ab = ab * env[:, None]
        u = batch.vectors.to(raw.dtype)
        u = u / torch.linalg.norm(u, dim=1, keepdim=True)
        eye = torch.eye(3, dtype=raw.dtype)
        raw = (
            raw
            + ab[:, 0, None, None] * eye
            + ab[:, 1, None, None] * (u[:, :, None] * u[:, None, :] - eye / 3.0)
        )
        raw = raw * self.config.fc_scale
        bond, self_fc = constrain(raw, batch)
        return bond, self_fc, self.descriptors(h)


def constrain(raw: Tensor, batch: GraphBatch) -> tuple[Tensor, Tensor]:
    """Impose pair symmetry and the acoustic sum rule on raw bond tensors.

    Parameters
    ----------
    raw
        (E, 3, 3) bond tensors, eV/A^2.
    batch
        The graphs the bonds belong to.

    Returns
    -------
    bond
        (E, 3, 3): ``bond[reverse[e]] == bond[e].T``, and the antisymmetric parts of the bonds
        leaving each atom sum to zero.
    self_fc
        (N, 3, 3) symmetric: ``-sum`` of the bonds leaving each atom.
    """
    phi = 0.5 * (raw + raw[batch.reverse].transpose(1, 2))
    n = batch.n_atoms
    anti = 0.5 * (phi - phi.transpose(1, 2))
    div = torch.zeros(n, 9, dtype=phi.dtype, device=phi.device)
    div = div.index_add(0, batch.src, anti.reshape(-1, 9))
    off = batch.src != batch.dst
    s, d = batch.src[off], batch.dst[off]
    ones = torch.ones(int(s.shape[0]), dtype=phi.dtype, device=phi.device)
    lap = torch.zeros(n, n, dtype=phi.dtype, device=phi.device)
    lap = lap.index_put((s, s), ones, accumulate=True).index_put((s, d), -ones, accumulate=True)
    # Add the projector on each connected part's constant vectors: the system becomes regular
    # and its solution is the one with zero mean per part (div sums to zero over every part).
    same = (batch.component[:, None] == batch.component[None, :]).to(phi.dtype)
    lap = lap + same / same.sum(dim=1, keepdim=True)
    x = torch.linalg.solve(lap, div).reshape(n, 3, 3)
    phi = phi - (x[batch.src] - x[batch.dst])
    self_fc = -torch.zeros(n, 3, 3, dtype=phi.dtype, device=phi.device).index_add(0, batch.src, phi)
    return phi, self_fc
