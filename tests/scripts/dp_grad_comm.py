"""Run on N ranks: all-reduce with 16-bit gradient communication (``grad_comm``) against what the math says.

Usage: mpiexec -n N python dp_grad_comm.py CASE [CASE ...], each CASE REDUCER:GRAD_COMM[:CLIP[:scaled]]
(several cases share one launch: starting the ranks costs more than running a case).
Each case: five SGD steps of a small MLP, the global batch split evenly over the ranks. At every step (without
CLIP) the gradients the optimizer receives must equal, bit for bit, an emulation built from every rank's own fp32
gradients: each rounded to GRAD_COMM, summed in fp32 in rank order, the sum rounded once more for the mpi
reducer; and they must differ from the exact fp32 sum. Rank 0 also trains one process on the global batch in
fp32 (the reference). ``scaled`` uses fp16-mixed's loss scaler with a loss 1e5 times smaller (and a learning
rate 1e5 times larger), so only scaling on the wire keeps the gradients inside fp16. For fp16, a sixth step
overflows fp16 on the last rank: with ``scaled`` every rank must skip it, without, every rank must stop with a
clear error. CASE ``nodes:GRAD_COMM`` runs the shm reducer with every rank its own "node", so that every sum
crosses between nodes (16-bit there too). Prints one JSON line per case on rank 0.
"""

import json
import sys

import torch
from torch import nn

import caldera
from caldera.comm.shm import NodeReducer
from caldera.models import MLP
from caldera.parallel import make_strategy
from caldera.precision import FP16Mixed

world = caldera.init()
torch.set_num_threads(1)
n, rank = world.size, world.rank
steps, batch = 5, 24
gen = torch.Generator().manual_seed(123)
x_all = torch.randn((steps + 1) * batch, 20, generator=gen)
y_all = torch.randint(0, 5, ((steps + 1) * batch,), generator=gen)


def make_model():
    torch.manual_seed(0)
    return MLP([20, 64, 64, 5])


def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def shard(k):
    lo = k * batch + rank * (batch // n)
    return x_all[lo : lo + batch // n], y_all[lo : lo + batch // n]


def emulate(grads, wire, reducer, scale):
    """What the reduction must give: every rank's gradient rounded (times scale) to the wire dtype, fp32 sum."""
    acc = (grads[0] * scale).to(wire).float()
    for g in grads[1:]:
        acc += (g * scale).to(wire).float()
    if reducer == "mpi":
        acc = acc.to(wire).float()  # the sum travels back in 16 bits
    return acc * (1.0 / scale) if scale != 1.0 else acc


def run_case(reducer, grad_comm, clip, scaled):
    wire = {"bf16": torch.bfloat16, "fp16": torch.float16}[grad_comm]
    factor, lr = (1e-5, 0.05 / 1e-5) if scaled else (1.0, 0.05)

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * factor

    model, shadow = make_model(), make_model()
    w0 = flat(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    received = []  # the gradients each optimizer step was given
    sgd.register_step_pre_hook(lambda *_: received.append(flat(p.grad for p in model.parameters())))
    precision = FP16Mixed() if scaled else None
    optimizer = precision.wrap_optimizer(sgd) if scaled else sgd
    if scaled:  # the shadow model gets the same unscaling hooks
        precision.wrap_optimizer(torch.optim.SGD(shadow.parameters(), lr=0.0))
    strategy = make_strategy("allreduce", bucket_mb=0.0005, first_bucket_mb=0.0005, reducer=reducer,
                             grad_comm=grad_comm, grad_clip=clip)  # fmt: skip
    net = strategy.setup(model, optimizer, world)
    staged = (
        strategy.node.slots if strategy.reducer == "shm" else strategy._jobs[0].send
    )  # what ranks exchange

    def scale_loss(loss):
        return precision.scale_loss(loss) if scaled else loss

    bit_equal, rounded = True, False
    for k in range(steps):
        x, y = shard(k)
        # This rank's own fp32 gradient, computed the way the strategy's backward computes it.
        shadow.load_state_dict(model.state_dict())
        shadow.zero_grad(set_to_none=True)
        (scale_loss(loss_fn(shadow(x), y)) / n).backward()
        everyone = world.comm.allgather(flat(p.grad for p in shadow.parameters()))
        wire_scale = precision.scaler.scale if scaled and grad_comm == "fp16" else 1.0
        strategy.backward(scale_loss(loss_fn(net(x), y)))
        strategy.step()
        exact = everyone[0].clone()
        for g in everyone[1:]:
            exact += g
        bit_equal = bit_equal and torch.equal(received[-1], emulate(everyone, wire, reducer, wire_scale))
        rounded = rounded or not torch.equal(received[-1], exact)

    weights = flat(model.parameters())
    result = {"case": [reducer, grad_comm, clip, scaled], "size": n, "reducer": strategy.reducer,
              "wire": str(staged.dtype), "steps": len(received), "bit_equal": all(world.comm.allgather(bit_equal)),
              "rounded": all(world.comm.allgather(rounded))}  # fmt: skip
    if grad_comm == "fp16":  # one more step, whose gradients on the last rank exceed fp16's range
        x, y = shard(steps)
        try:
            strategy.backward(scale_loss(loss_fn(net(x), y) * (1e9 if rank == n - 1 else 1.0)))
            strategy.step()
            outcome = "stepped"
        except FloatingPointError as exc:
            outcome = str(exc)
        result["overflow"] = world.comm.allgather(outcome)
        result["unchanged"] = all(world.comm.allgather(torch.equal(weights, flat(model.parameters()))))
        result["skipped"] = precision.scaler.skipped if scaled else None
    everyone = torch.stack(world.comm.allgather(flat(model.parameters())))
    result["spread"] = (everyone - everyone[0]).abs().max().item()
    strategy.close()

    if rank == 0:
        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
        for k in range(steps):
            loss_fn(ref(x_all[k * batch : (k + 1) * batch]), y_all[k * batch : (k + 1) * batch]).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            ref_opt.step()
            ref_opt.zero_grad()
        update, ref_update = weights - w0, flat(ref.parameters()) - w0
        result["rel_update_error"] = ((update - ref_update).norm() / ref_update.norm()).item()
        print(json.dumps(result), flush=True)


def run_between_nodes(grad_comm):
    """Every rank its own "node": the shm reducer's path between nodes, on one machine."""
    wire = {"bf16": torch.bfloat16, "fp16": torch.float16}[grad_comm]
    raw = world.comm.comm
    reducer = NodeReducer(raw, 1000, wire, node=raw.Split(raw.Get_rank(), 0))
    mine = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
    everyone = world.comm.allgather(mine)
    reducer.reduce(0, 600, mine[:600].clone())
    reducer.reduce(600, 1000, mine[600:].clone())
    reducer.finish()
    got = reducer.result.clone()
    reducer.close()
    result = {
        "case": ["nodes", grad_comm, None, False],
        "bit_equal": torch.equal(got, emulate(everyone, wire, "mpi", 1.0)),
    }
    spread = torch.stack(world.comm.allgather(got))
    result["spread"] = (spread - spread[0]).abs().max().item()
    if rank == 0:
        print(json.dumps(result), flush=True)


for case in sys.argv[1:]:
    reducer, grad_comm, *rest = case.split(":") + ["", ""]
    if reducer == "nodes":
        run_between_nodes(grad_comm)
    else:
        run_case(reducer, grad_comm, float(rest[0]) if rest[0] else None, rest[1] == "scaled")
