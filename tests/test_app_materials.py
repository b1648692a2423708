"""The materials application: reference physics, a symmetric conservative potential, and training that learns it."""

import importlib.util
import math

import numpy as np
import pytest
import torch

import caldera
from caldera.cli import main
from caldera.models.potential import (
    ANGULAR,
    NeuralPotential,
    SymmetryFunctions,
    energy_force_loss,
    energy_mae,
    force_mae,
)
from caldera.sims.atoms import baselines, dataset, lattice_cluster, lj_energy_forces, sample
from tests.conftest import ROOT


def _random_cluster(rng: np.random.Generator, n: int = 7) -> np.ndarray:
    return lattice_cluster(n)[None] + 0.08 * rng.normal(size=(1, n, 3))


def test_reference_forces_are_minus_the_finite_difference_gradient_of_the_energy():
    rng = np.random.default_rng(0)
    pos = _random_cluster(rng)
    _, forces = lj_energy_forces(pos)
    h, fd = 1e-6, np.zeros_like(pos)
    for i, c in np.ndindex(pos.shape[1], 3):
        step = np.zeros_like(pos)
        step[0, i, c] = h
        fd[0, i, c] = -(lj_energy_forces(pos + step)[0] - lj_energy_forces(pos - step)[0])[0] / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=1e-6, atol=1e-6)
    assert np.abs(forces.sum(axis=1)).max() < 1e-10  # Newton's third law: no net force


def test_reference_energy_of_a_dimer_and_the_cluster_minimum():
    r = 1.3
    energy, _ = lj_energy_forces(np.array([[[0.0, 0, 0], [r, 0, 0]]]))
    assert energy[0] == pytest.approx(4 * (r**-12 - r**-6), rel=1e-12)
    # Annealed from the fcc start, 13 atoms settle near the known icosahedral minimum E = -44.3268.
    x, e, _, _ = sample(n_configs=4, atoms=13, t_min=0.01, t_max=0.01, replicas=4, seed=1)
    assert -44.33 < e.min() < -43.5


def test_dataset_holds_out_whole_replicas_and_is_seeded():
    train, val = dataset(n_configs=200, replicas=10, val_fraction=0.2, seed=2)
    assert train.tensors[0].shape == (160, 13, 3) and val.tensors[1].shape == (40, 1 + 39)
    again, _ = dataset(n_configs=200, replicas=10, val_fraction=0.2, seed=2)
    assert torch.equal(train.tensors[1], again.tensors[1])
    with pytest.raises(ValueError, match="t_max <= 0.5"):
        dataset(t_max=2.0)


def _brute_force_angular(pos: np.ndarray, cutoff: float, eta: float) -> np.ndarray:
    """G4 by the textbook triple loop: the independent check of the O(N^2) moment-tensor evaluation."""
    n = pos.shape[1]
    out = np.zeros((pos.shape[0], n, len(ANGULAR)))
    fc = lambda d: 0.5 * (math.cos(math.pi * d / cutoff) + 1) if d < cutoff else 0.0  # noqa: E731
    for b, i, j, k in np.ndindex(pos.shape[0], n, n, n):
        if len({i, j, k}) == 3:
            rij, rik = pos[b, j] - pos[b, i], pos[b, k] - pos[b, i]
            dij, dik = np.linalg.norm(rij), np.linalg.norm(rik)
            cos = rij @ rik / (dij * dik)
            for a, (zeta, lam) in enumerate(ANGULAR):
                w = math.exp(-eta * (dij**2 + dik**2)) * fc(dij) * fc(dik)
                out[b, i, a] += 2 ** (1 - zeta) * (1 + lam * cos) ** zeta * w
    return out


def test_angular_descriptors_equal_the_triple_sum():
    pos = _random_cluster(np.random.default_rng(1), 6) * 1.3
    sf = SymmetryFunctions(cutoff=2.5).double()
    got = sf(torch.from_numpy(pos))[..., -len(ANGULAR) :].numpy()
    np.testing.assert_allclose(got, _brute_force_angular(pos, 2.5, sf.angular_eta), rtol=1e-10, atol=1e-12)


@pytest.fixture
def model64() -> NeuralPotential:
    torch.manual_seed(0)
    return NeuralPotential(hidden=16, atom_energy=-3.0).double().eval()


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.linalg.det(q))  # a proper rotation


def test_model_is_invariant_and_its_forces_rotate_with_the_atoms(model64):
    pos = torch.from_numpy(_random_cluster(np.random.default_rng(3), 9))
    rot, shift, perm = _rotation(4), torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), torch.randperm(9)
    out = model64(pos)
    energy, forces = out[:, 0], out[:, 1:].reshape(1, 9, 3)
    moved = model64((pos @ rot.T + shift)[:, perm])
    torch.testing.assert_close(moved[:, 0], energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        moved[:, 1:].reshape(1, 9, 3), (forces @ rot.T)[:, perm], rtol=1e-10, atol=1e-12
    )
    assert forces.sum(1).abs().max() < 1e-10  # translation invariance: no net force


def test_model_forces_are_minus_the_finite_difference_gradient_of_its_energy(model64):
    pos = torch.from_numpy(_random_cluster(np.random.default_rng(5), 5))
    with torch.no_grad():  # as in evaluation: forces must still come out
        forces = model64(pos)[:, 1:].reshape(1, 5, 3)
        h, fd = 1e-5, torch.zeros_like(pos)
        for i, c in np.ndindex(5, 3):
            step = torch.zeros_like(pos)
            step[0, i, c] = h
            fd[0, i, c] = -(model64.energy(pos + step) - model64.energy(pos - step))[0] / (2 * h)
    torch.testing.assert_close(forces, fd, rtol=1e-7, atol=1e-8)


def test_bad_inputs_name_the_fix(model64):
    with pytest.raises(ValueError, match=r"\(configurations, atoms, 3\)"):
        model64(torch.zeros(4, 39, dtype=torch.float64))
    with pytest.raises(ValueError, match="zeta must be a whole number"):
        SymmetryFunctions(angular=((1.5, 1.0),))
    with pytest.raises(ValueError, match=r"\(n, 1 \+ 3N\)"):
        force_mae(torch.zeros(2, 11), torch.zeros(2, 11))


def test_short_training_beats_the_trivial_predictors(tmp_path):
    caldera.init(seed=0)
    train, val = dataset(n_configs=400, replicas=20, seed=0)
    model = NeuralPotential(hidden=32, atom_energy=-3.0)
    trainer = caldera.Trainer(
        model, torch.optim.Adam(model.parameters(), 5e-3), energy_force_loss,
        metrics={"energy_mae": energy_mae, "force_mae": force_mae}, max_epochs=4, batch_size=16,
        run_dir=tmp_path, progress=False, plot=False,
    )  # fmt: skip
    history = trainer.fit(train, val)
    base = baselines(val.tensors[1])
    # 92 steps on held-out replicas: the forces must be > 3x better than predicting none (measured: 5x).
    assert history[-1]["val_force_mae"] < 0.3 * base["zero_force_mae"], (history[-1], base)
    assert history[-1]["val_energy_mae"] < 0.5 * base["mean_energy_mae"], (history[-1], base)


def test_run_file_passes_caldera_check(capsys):
    assert main(["check", str(ROOT / "examples/materials_potential.toml")]) == 0
    assert '"source": "atoms"' in capsys.readouterr().out


def _example(name: str):
    """Import an example script as a module (its functions, not its main)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_on_the_fly_learning_calls_the_reference_only_when_unsure_and_beats_the_seed_only_committee():
    active_md = _example("materials_active")
    world = caldera.init(seed=0)
    committee = active_md.build_committee(2, world, hidden=16)
    x, y = active_md.seed_set(16)
    for member in committee:
        member.add(x, y)
    active_md.train(committee, 40)
    seed_weights = [{k: v.clone() for k, v in m.model.state_dict().items()} for m in committee]
    received = []

    def reference(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        received.append(len(pos))
        return lj_energy_forces(pos)

    start, temps = x[:4], np.full(4, 0.28)
    md = dict(steps=200, check_every=5, threshold=1.0, train_steps=3)
    active = active_md.run_md(
        committee, start, temps, rng=np.random.default_rng(0), reference=reference, **md
    )
    for member, weights in zip(committee, seed_weights):
        member.model.load_state_dict(weights)
    frozen = active_md.run_md(committee, start, temps, rng=np.random.default_rng(0), learn=False, **md)
    # (a) the reference saw exactly the flagged configurations (disagreement above the threshold, or caught by the
    # blow-up guard), and far from every check (measured: 95 of 160).
    calls = sum(received)
    assert calls == active["ref_calls"][-1] == sum(active["flagged"]) + active["guard_calls"][-1] > 0
    assert min(active["flagged_disagreement_min"]) > md["threshold"]
    assert calls < 0.8 * sum(active["checked"]), (calls, sum(active["checked"]))
    assert frozen["ref_calls"][-1] == 0
    # (b) along its own trajectory (reference used for evaluation only), the learning committee's true force error
    # over the last quarter is under 0.6x the seed-only committee's (measured: 1.2 vs 3.4, 0.34x).
    errors = active_md.tail_mean(active["force_mae"]), active_md.tail_mean(frozen["force_mae"])
    assert errors[0] < 0.6 * errors[1], errors


def test_md_scripts_report_the_mean_and_sd_over_seeds_and_every_seed():
    md = _example("materials_md")
    three = md.spread([0.1, 0.2, 0.3])
    assert three["mean"] == pytest.approx(0.2) and three["sd"] == pytest.approx(0.1)
    assert three["values"] == [0.1, 0.2, 0.3]
    assert md.spread([0.5])["sd"] == 0.0  # one run: no spread, not an error
    per_seed = [{key: 1.0 + i for key, _, _ in md.ROWS} for i in range(2)]
    summary = {key: md.spread([s[key] for s in per_seed]) for key, _, _ in md.ROWS}
    data = {"zero_force_mae": 3.378, "mean_energy_mae": 0.29}
    text = md.table(summary, {"drift_per_atom_reference": 6.8e-5}, data)
    assert "mean ± sd over 2 seeds" in text
    assert "| **1.500** ± 0.707 | 1.000, 2.000 | 3.378 (zero force) |" in text
    assert len(text.splitlines()) == 2 + len(md.ROWS)
    # materials_active.py --seeds: seed 0 keeps the random streams of the runs before seeds; others differ.
    active = _example("materials_active")
    assert (active.stream(0, 3, 1).random(4) == np.random.default_rng([3, 1]).random(4)).all()
    assert (active.stream(2, 3, 1).random(4) != np.random.default_rng([3, 1]).random(4)).all()
    rows = active.seeds_table({key: active.spread([1.0, 3.0]) for key, _, _ in active.SEED_ROWS}, [0, 2])
    assert "| over seeds 0, 2 | mean ± sd | per seed |" in rows
    assert "| reference calls | **2** ± 1 | 1, 3 |" in rows
