"""A whole new strategy in one file: sum every rank's gradients, divide by the ranks, step (docs/parallel.md).

Registering it is the one line ``@register(...)``; importing this module makes ``strategy = "toy-sum-average"``
selectable. Everything it does not define (no_sync, data_shards, train_batch, forward_batch, consolidate,
state_dict, load_state_dict, close) is the base class's single-process default.
"""

import torch

from caldera.parallel import Strategy, register


@register("toy-sum-average")
class SumThenAverage(Strategy):
    """Data parallel without buckets or overlap: one all-reduce of all gradients per step."""

    def setup(self, model, optimizer, world):
        """Start every rank from rank 0's weights."""
        self.model, self.optimizer, self.world = model, optimizer, world
        for p in model.parameters():
            world.comm.Bcast(p.data, root=0)
        return model

    def backward(self, loss):
        """Local gradients only."""
        loss.backward()

    def step(self):
        """Average the gradients over the ranks, then step and zero them."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.world.comm.Allreduce(flat)
        flat /= self.world.size
        at = 0
        for p in params:
            p.grad.copy_(flat[at : at + p.numel()].view_as(p))
            at += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
