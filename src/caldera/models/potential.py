"""A Behler-Parrinello neural-network interatomic potential: energies from invariant descriptors, forces by autograd.

Each atom sees its neighbours through symmetry functions that do not change under rotation, translation or a
relabelling of atoms: radial ones (Gaussian shells of neighbour density) and angular ones (Gaussian-weighted bond
angle terms), all multiplied by a smooth cosine cutoff. One MLP maps an atom's descriptors to its energy; the
total energy is the sum, and the forces are -dE/dx from autograd, so they are exactly the gradient of the energy
the model reports (a conservative force field, which molecular dynamics needs). The model's output packs both:
(n, 1 + 3N) = [energy, forces flattened], the layout of ``caldera.sims.atoms``' targets.

Forces need gradients with respect to the positions, also in evaluation (which runs under ``torch.no_grad``), so
``forward`` turns gradients on for itself; in training it keeps the graph of the forces (``create_graph``) so a
loss on the forces can train the weights (a double backward).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (zeta, lambda) of the angular functions: zeta sharpens the angle term, lambda = +1 / -1 favours 0 / 180 degrees.
ANGULAR = ((1.0, 1.0), (1.0, -1.0), (2.0, 1.0), (2.0, -1.0))


class SymmetryFunctions(nn.Module):
    """Per-atom radial (and angular) Behler-Parrinello symmetry functions of positions (n, N, 3) -> (n, N, F)."""

    def __init__(self, cutoff: float = 3.0, radial: int = 20, r_min: float = 0.8,
                 angular: tuple[tuple[float, float], ...] = ANGULAR,
                 angular_eta: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        if cutoff <= r_min or radial < 1:
            raise ValueError(f"need cutoff > r_min and radial >= 1 (got cutoff = {cutoff}, r_min = {r_min}, "
                             f"radial = {radial})")  # fmt: skip
        self.cutoff, self.angular_eta = cutoff, angular_eta
        centres = torch.linspace(r_min, cutoff, radial)
        width = (cutoff - r_min) / max(1, radial - 1)  # neighbouring shells overlap by about one width
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("eta", torch.tensor(0.5 / width**2), persistent=False)
        self.n_angular = len(angular)
        self.max_zeta = _check_angular(angular)
        # expansion[m, a] = 2^(1 - zeta_a) binom(zeta_a, m) lambda_a^m: G4_a = sum_m expansion[m, a] S_m
        table = [
            [2 ** (1 - z) * math.comb(int(z), m) * lam**m for z, lam in angular]
            for m in range(self.max_zeta + 1)
        ]
        expansion = torch.tensor(table, dtype=torch.float32).reshape(self.max_zeta + 1, len(angular))
        self.register_buffer("expansion", expansion, persistent=False)

    @property
    def size(self) -> int:
        """Descriptors per atom."""
        return len(self.centres) + self.n_angular

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """Return descriptors (n, N, F) of positions (n, N, 3)."""
        n_atoms = pos.shape[1]
        eye = torch.eye(n_atoms, dtype=pos.dtype, device=pos.device)
        vec = pos[:, None, :, :] - pos[:, :, None, :]  # r_j - r_i: (n, i, j, 3)
        # +eye keeps sqrt away from 0 on the diagonal (its gradient would be inf there); fc masks it out.
        r = ((vec**2).sum(-1) + eye).sqrt()
        fc = 0.5 * (torch.cos(math.pi * r.clamp(max=self.cutoff) / self.cutoff) + 1) * (1 - eye)
        shells = torch.exp(-self.eta * (r[..., None] - self.centres) ** 2)
        features = [(shells * fc[..., None]).sum(2)]
        if self.n_angular:
            features.append(self._angular(vec, r, fc))
        return torch.cat(features, -1)

    def _angular(self, vec: torch.Tensor, r: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        """G4_i = 2^(1-zeta) sum_{j != k} (1 + lambda cos theta_ijk)^zeta exp(-eta (r_ij^2 + r_ik^2)) fc_ij fc_ik.

        Computed without the (n, N, N, N) triplet tensor: for integer zeta the binomial expansion turns the
        sum over pairs of neighbours into squared norms of per-atom moment tensors,
        sum_{j,k} w_j w_k (u_j . u_k)^m = |sum_j w_j u_j^(x)m|^2, which costs O(N^2) instead of O(N^3)."""
        unit = vec / r[..., None]
        w = torch.exp(-self.angular_eta * r**2) * fc  # (n, i, j); zero for j = i
        self_terms = (w**2).sum(-1)  # the j = k terms (cos = 1), which G4 leaves out
        moment, pair_sums = w[..., None], []
        for m in range(self.max_zeta + 1):
            if m:
                moment = (moment[..., None] * unit[..., None, :]).flatten(-2)  # w u^(x)m, flattened: 3^m
            pair_sums.append(moment.sum(2).pow(2).sum(-1) - self_terms)
        sums = torch.stack(pair_sums, -1)  # (n, i, m): sum_{j != k} w_j w_k cos^m
        return sums @ self.expansion.to(sums.dtype)


class NeuralPotential(nn.Module):
    """Energies and forces of atomic configurations: descriptors -> per-atom MLP -> sum; forces = -dE/dx.

    ``forward(pos (n, N, 3)) -> (n, 1 + 3N)`` = [energy, forces flattened]; ``energy(pos) -> (n,)``."""

    def __init__(self, hidden: int = 64, layers: int = 2, cutoff: float = 3.0, radial: int = 20,
                 angular: bool = True, atom_energy: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.descriptors = SymmetryFunctions(cutoff, radial, angular=ANGULAR if angular else ())
        sizes = [self.descriptors.size] + [hidden] * layers
        mlp: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mlp += [nn.Linear(a, b), nn.SiLU()]  # smooth: forces are derivatives, so no kinks (ReLU) allowed
        last = nn.Linear(sizes[-1], 1)
        nn.init.constant_(last.bias, atom_energy)  # start at a typical energy per atom, not at 0
        self.atom_mlp = nn.Sequential(*mlp, last)

    def energy(self, pos: torch.Tensor) -> torch.Tensor:
        """Total energies (n,) of positions (n, N, 3)."""
        if pos.dim() != 3 or pos.shape[-1] != 3:
            raise ValueError(f"positions must be (configurations, atoms, 3); got shape {tuple(pos.shape)}")
        return self.atom_mlp(self.descriptors(pos)).squeeze(-1).sum(-1)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """Return (n, 1 + 3N) = [energy, forces flattened] for positions (n, N, 3)."""
        train_graph = (
            torch.is_grad_enabled()
        )  # False in evaluation: the forces need no graph of their own then
        with torch.enable_grad():
            pos = pos.detach().requires_grad_(True)
            energy = self.energy(pos)
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=train_graph)
        out = torch.cat([energy[:, None], -grad.flatten(1)], dim=1)
        return out if train_graph else out.detach()


def _check_angular(angular: tuple[tuple[float, float], ...]) -> int:
    """Return the largest zeta; raise unless every zeta is a whole number >= 1 and every lambda is +1 or -1."""
    for zeta, lam in angular:
        if zeta < 1 or zeta != int(zeta) or lam not in (1, -1):
            raise ValueError(f"angular symmetry function (zeta = {zeta}, lambda = {lam}): zeta must be a whole "
                             "number >= 1 and lambda +1 or -1, e.g. (1, 1), (4, -1)")  # fmt: skip
    return int(max((z for z, _ in angular), default=0))


def _split(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if pred.shape != target.shape or pred.dim() != 2 or (pred.shape[1] - 1) % 3:
        raise ValueError(f"energy-force tensors must both be (n, 1 + 3N) = [energy, forces]; got prediction "
                         f"{tuple(pred.shape)} and target {tuple(target.shape)}")  # fmt: skip
    return pred - target, target, (pred.shape[1] - 1) // 3


def energy_force_loss(pred: torch.Tensor, target: torch.Tensor, force_weight: float = 1.0) -> torch.Tensor:
    """MSE of the energy per atom + ``force_weight`` x MSE of the force components."""
    err, _, n_atoms = _split(pred, target)
    return (err[:, 0] / n_atoms).pow(2).mean() + force_weight * err[:, 1:].pow(2).mean()


def energy_mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the energy per atom."""
    err, _, n_atoms = _split(pred, target)
    return (err[:, 0] / n_atoms).abs().mean()


def force_mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the force components."""
    return _split(pred, target)[0][:, 1:].abs().mean()


def force_rel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Force error relative to the force scale: ||F_pred - F|| / ||F|| over the batch."""
    err, target, _ = _split(pred, target)
    return err[:, 1:].norm() / target[:, 1:].norm().clamp_min(1e-12)
