"""The built-in names a run file may use, each mapped to the code that implements it ('package.module:attr').

The config validates names against these tables without importing data/, models/, parallel/ or train/; the
code behind a name is imported when it is first looked up. ``caldera.data.SOURCES``, ``caldera.models.MODELS``,
``caldera.train.losses.LOSSES`` and ``caldera.train.metrics.METRICS`` are these same tables. A new built-in is one
line here (plus its module); a strategy's module also registers its class with ``@register(name)``.
"""

from __future__ import annotations

from caldera.refs import Builtins

# [data] source
SOURCES = Builtins({
    "digits": "caldera.data.builtin:digits", "heat": "caldera.sims.heat:dataset",
    "scientific": "caldera.data.scientific:dataset", "atoms": "caldera.sims.atoms:dataset",
    "phantoms": "caldera.sims.phantoms:dataset", "climate": "caldera.sims.climate:dataset",
    "bragg": "caldera.sims.bragg:dataset", "focus": "caldera.sims.focus:dataset",
    "chirp": "caldera.sims.chirp:dataset",
})  # fmt: skip

# [model] name
MODELS = Builtins({
    "mlp": "caldera.models:MLP", "small_cnn": "caldera.models:SmallCNN", "unet_small": "caldera.models:UNetSmall",
    "neural_potential": "caldera.models.potential:NeuralPotential", "climate_net": "caldera.models.climate:ClimateNet",
    "transformer": "caldera.models.transformer:Transformer", "bragg": "caldera.models.bragg:BraggNN",
    "denoise_unet": "caldera.models.imaging:DenoiseUNet",
    "focus": "caldera.models.focus:FocusNet", "chirp": "caldera.models.chirp:ChirpNet",
})  # fmt: skip

# [train] loss. Named here, not by import path, so that a run directory that uses them needs no --trust-code
# (docs/security.md).
LOSSES = Builtins({
    "mse": "torch.nn:MSELoss", "l1": "torch.nn:L1Loss", "cross_entropy": "torch.nn:CrossEntropyLoss",
    "huber": "torch.nn:HuberLoss", "energy_force": "caldera.models.potential:energy_force_loss",
    "climate_mse": "caldera.sims.climate:weighted_mse",
})  # fmt: skip

# [optim] name: torch.optim's optimizers by their lower-case names (``sgd`` also takes [optim] momentum).
OPTIMIZERS = Builtins({
    name.lower(): f"torch.optim:{name}"
    for name in ("SGD", "Adam", "AdamW", "RAdam", "NAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop")
})  # fmt: skip

# [optim] scheduler: torch's learning-rate schedulers that need no metric (ReduceLROnPlateau does).
SCHEDULERS = Builtins({
    name: f"torch.optim.lr_scheduler:{cls}" for name, cls in (
        ("onecycle", "OneCycleLR"), ("cosine_annealing", "CosineAnnealingLR"), ("step", "StepLR"),
        ("multistep", "MultiStepLR"), ("exponential", "ExponentialLR"), ("linear", "LinearLR"),
        ("polynomial", "PolynomialLR"), ("cosine_warm_restarts", "CosineAnnealingWarmRestarts"))
})  # fmt: skip

# [train] metrics
METRICS = Builtins({
    **{name: f"caldera.train.metrics:{name}" for name in ("accuracy", "mae", "rmse", "rel_l2", "psnr")},
    **{name: f"caldera.models.potential:{name}" for name in ("energy_mae", "force_mae", "force_rel")},
    "lat_weighted_rmse": "caldera.sims.climate:lat_weighted_rmse", "peak_error_px": "caldera.sims.bragg:peak_error_px",
})  # fmt: skip

# [parallel] strategy; caldera.parallel.register adds a user's strategy to this table too.
STRATEGIES = Builtins({
    "single": "caldera.parallel.single:Single", "allreduce": "caldera.parallel.allreduce:AllReduce",
    "local-sgd": "caldera.parallel.local_sgd:LocalSGD", "pipeline": "caldera.parallel.pipeline:Pipeline",
    "async-shared": "caldera.parallel.async_shared:AsyncShared",
    "async-ps": "caldera.parallel.param_server:ParameterServer", "tensor": "caldera.parallel.tensor:TensorParallel",
})  # fmt: skip

# Facts the config checks about strategies before anything runs (the strategies read them from here too).
LOOP_STRATEGIES = ("async-shared", "async-ps")  # the strategies that run their own loop (``fit``)
_INSTEAD = "or use strategy = 'local-sgd' or 'allreduce'"
# strategy -> {precision mode it cannot run: why, and the fix}
REFUSED_PRECISION: dict[str, dict[str, str]] = {
    name: {"bf16-true": f"{name} keeps its shared or served weights in fp32 and steps them there, so bf16-true "
           f"(bf16 weights with fp32 masters) does not apply; set [precision] mode = 'bf16-mixed', {_INSTEAD}"}
    for name in LOOP_STRATEGIES
}  # fmt: skip
REFUSED_PRECISION["tensor"] = {
    "bf16-true": "tensor keeps the split weights as slices, which bf16-true's fp32 master "
    "copies of the whole weights do not follow; set [precision] mode = 'bf16-mixed'"
}


def unsupported(name: str, precision: str) -> str | None:
    """What strategy ``name`` cannot do with ``precision``, as a message with the fix (None when it can).

    One table for both places that ask: the run file's validation and ``parallel._async.check_run`` (the Python API)."""
    return REFUSED_PRECISION.get(name, {}).get(precision)


# strategy -> why [train] compile does not apply to it, with the fix (checked by the config and by the Trainer)
NOT_COMPILED: dict[str, str] = {
    "pipeline": "strategy 'pipeline' runs each rank's stage itself, micro-batch by micro-batch, and swaps the other "
    "stages' weights in and out around checkpoints, so it is not compiled; set compile = false, or use 'allreduce'",
    "async-shared": "strategy 'async-shared' trains in worker processes that receive the model pickled, and a "
    "compiled module does not pickle; set compile = false, or use 'allreduce' or 'local-sgd'",
    "tensor": "strategy 'tensor' calls MPI inside its split layers' autograd functions, where torch.compile would "
    "break the graph at every layer (no gain, and untested); set compile = false",
    "async-ps": "strategy 'async-ps' runs its own loop on its worker ranks, not the trainer's step that compiles "
    "the model; set compile = false, or use 'allreduce' or 'local-sgd'",
}  # fmt: skip

# A run directory's final weights written shard-wise (tensor parallel: caldera.parallel.tensor; ZeRO-3:
# caldera.parallel.fsdp), instead of model.pt: the layout (JSON, its "kind" says whose), the tensors every rank
# holds whole, and one file per rank.
WEIGHT_SHARDS = "model-shards"
WEIGHT_LAYOUT, WEIGHT_SHARED = "layout.json", "shared.pt"
