"""Meta-device construction: a model built without storage, materialised one module at a time, starts from the same
weights as an ordinary construction with the same seed; a strategy that does not materialise refuses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caldera.models import MLP, Transformer
from caldera.models.materialize import materialize, on_meta
from caldera.train.trainer import Trainer
from caldera.world import seed_everything


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (Transformer, {"in_features": 8, "dim": 32, "heads": 4, "layers": 2}),
        (MLP, {"sizes": [16, 32, 32, 4]}),
    ],
)
def test_materialising_in_order_gives_the_ordinary_initial_weights(cls, args):
    seed_everything(7)
    plain = cls(**args)
    after_plain = torch.get_rng_state()
    seed_everything(7)
    seeded = torch.get_rng_state()
    with torch.device("meta"):
        model = cls(**args)
    assert on_meta(model) and torch.equal(torch.get_rng_state(), seeded)  # meta construction drew nothing
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen: list[str] = []

    def keep(name: str, module: nn.Module) -> None:
        # One module at a time: when a module is handed over, every module after it is still without storage.
        assert not any(t.is_meta for t in module.parameters(recurse=False))
        seen.append(name)
        later = [m for n, m in model.named_modules() if n not in seen and n != ""]
        owned = [t for m in later for t in m.parameters(recurse=False)]
        assert all(t.is_meta for t in owned) or name == ""

    materialize(model, keep, optimizer=optimizer)
    assert not on_meta(model)
    assert torch.equal(torch.get_rng_state(), after_plain)  # the same numbers were drawn, no more
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Children first, in registration order: the order in which an ordinary construction draws its weights.
    assert seen == [n for n, m in _post_order(model) if list(m.parameters(recurse=False))]
    # The optimizer built over the meta parameters now steps the real ones.
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def _post_order(model: nn.Module, prefix: str = ""):
    for key, child in model.named_children():
        yield from _post_order(child, f"{prefix}{key}.")
    yield prefix.rstrip("."), model


class _NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def test_a_meta_module_without_reset_parameters_and_a_strategy_that_cannot_materialise_are_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 3), _NoReset())
    with pytest.raises(TypeError, match=r"module '1' \(_NoReset\) has parameters on the meta device but no "):
        materialize(model)
    with torch.device("meta"):
        model = nn.Linear(2, 3)
    with pytest.raises(
        ValueError, match="the model is on the meta device .* strategy Single does not materialise"
    ):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss, progress=False)
