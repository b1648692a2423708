"""One class per export format behind one protocol: its name, its file, how to write it, how to load it back.

``caldera export`` asks for user-facing formats (safetensors, torchscript, pt2, onnx); ``pt2`` is two artefacts,
the ExportedProgram and the AOTInductor package compiled from it (one more for CUDA with ``--device cuda``).
Each writes its file under a temporary name and renames it when complete, so a format that fails leaves no file.
``load`` returns a callable taking a batch tensor, used by verification and by nothing that runs another's code
(safetensors holds tensors only; the others are our own artefacts, just written).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from caldera.errors import ConfigError

# The optional packages each format needs, with the pip line that installs them.
PIP = "pip install 'caldera[export]'"


def require(module: str, fmt: str) -> Any:
    """Import an optional package; a ConfigError names the install line when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"format {fmt}: needs the {module} package: {PIP} (or pip install {module})"
        ) from None


@dataclass
class Job:
    """What every format exports: the physical-units module (eval mode), an example batch (>= 2 samples, so the
    batch size is not specialised on 1), the metadata of the contract, and a factory of blank modules."""

    module: nn.Module
    example: torch.Tensor
    metadata: dict[str, str]
    blank: Callable[[], nn.Module]
    _program: Any = field(default=None, repr=False)

    def dynamic_shapes(self) -> tuple[dict[int, Any]]:
        """The batch axis of the one input is dynamic; every other axis is fixed."""
        return ({0: torch.export.Dim("batch", min=1)},)

    def program(self) -> torch.export.ExportedProgram:
        """The module through torch.export (once; the ExportedProgram and the AOTInductor package share it)."""
        if isinstance(self._program, BaseException):  # the AOTInductor package needs what already failed
            raise self._program
        if self._program is None:
            try:
                with torch.no_grad():
                    self._program = torch.export.export(self.module, (self.example,),
                                                        dynamic_shapes=self.dynamic_shapes())  # fmt: skip
            except Exception as exc:
                self._program = exc
                raise
        return self._program


class Format(Protocol):
    """An export format: ``export`` writes ``file_name`` from a Job; ``load`` gives back a batch -> output callable."""

    name: str  # the user-facing format this artefact belongs to (--format)
    key: str  # this artefact's name in the card (pt2 makes two: exported, aoti)
    file_name: str
    device: str

    def export(self, job: Job, path: Path) -> Path: ...

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]: ...


def _atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a file beside ``path`` (same suffix: some writers insist on it), then rename it to ``path``."""
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _single(out: Any) -> Any:
    """A one-element list (how compiled runtimes return one output) as that element; tuples as tuples."""
    if isinstance(out, (list, tuple)) and len(out) == 1:
        return out[0]
    return tuple(out) if isinstance(out, list) else out


class Safetensors:
    """Weights of the physical-units module (normalisation buffers included), without pickle."""

    name = key = "safetensors"
    file_name = "model.safetensors"
    device = "cpu"

    def export(self, job: Job, path: Path) -> Path:
        st = require("safetensors.torch", self.name)
        return _atomically(path, lambda tmp: st.save_model(job.module, str(tmp), metadata=job.metadata))

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]:
        st = require("safetensors.torch", self.name)
        module = job.blank()
        st.load_model(module, path)  # strict: every tensor of the module, nothing else
        return module.eval()


class TorchScript:
    """TorchScript by tracing: libtorch runs it eagerly (torch::jit::load), no Python."""

    name = key = "torchscript"
    file_name = "model.ts"
    device = "cpu"

    def export(self, job: Job, path: Path) -> Path:
        with torch.no_grad():
            # check_trace would run the module twice more; verification compares it with the eager model anyway.
            traced = torch.jit.trace(job.module, (job.example,), check_trace=False)
        files = {"caldera.json": json.dumps(job.metadata, indent=2)}
        return _atomically(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=files))

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]:
        return torch.jit.load(str(path), map_location="cpu").eval()


class ExportedProgram:
    """torch.export's ExportedProgram (dynamic batch): the graph other compilers and runtimes start from."""

    name, key = "pt2", "exported"
    file_name = "model.exported.pt2"
    device = "cpu"

    def export(self, job: Job, path: Path) -> Path:
        program = job.program()
        return _atomically(path, lambda tmp: torch.export.save(program, str(tmp)))

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]:
        return torch.export.load(str(path)).module()


class AOTInductor:
    """An AOTInductor package: the graph compiled to a shared library that runs without Python (the C API loads it)."""

    name = "pt2"

    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        self.device = device  # cpu, cuda, cuda:1: where it is compiled and verified
        self.threads = threads if device == "cpu" else None
        self.key = "aoti" if device == "cpu" else "aoti-cuda"  # the package runs on any GPU of the kind
        self.file_name = f"model.{self.key}.pt2"

    def export(self, job: Job, path: Path) -> Path:
        from torch._inductor import aoti_compile_and_package

        program = job.program()
        if self.device != "cpu":  # the package is compiled for the device its program's tensors live on
            with torch.no_grad():
                program = torch.export.export(job.module.to(self.device), (job.example.to(self.device),),
                                              dynamic_shapes=job.dynamic_shapes())  # fmt: skip
            job.module.to("cpu")
        configs = {"aot_inductor.package_constants_in_so": True,
                   **(aoti_configs(self.threads) if self.device == "cpu" else {}),
                   "aot_inductor.metadata": {**job.metadata, "caldera.device": self.device.split(":")[0],
                                             "caldera.threads": str(self.threads or 0)}}  # fmt: skip
        # Under no_grad: inductor applies `freezing` only when grad mode is off at compile time, and silently
        # ignores it otherwise (torch 2.13 compile_fx); with it off the convolutions stay ATen's.
        with torch.no_grad():
            return _atomically(path, lambda tmp: aoti_compile_and_package(program, package_path=str(tmp),
                                                                          inductor_configs=configs))  # fmt: skip

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]:
        from torch._inductor import aoti_load_package

        runner = aoti_load_package(str(path))
        device = self.device
        return lambda x: _single(runner(x.to(device)))


class Onnx:
    """ONNX through torch's dynamo exporter (dynamic batch); verified in onnxruntime."""

    name = key = "onnx"
    file_name = "model.onnx"
    device = "cpu"

    def export(self, job: Job, path: Path) -> Path:
        for module in ("onnx", "onnxscript"):
            require(module, self.name)
        n_out = len(job.metadata["caldera.outputs"].split(";"))
        names = [spec.split(":")[0] for spec in job.metadata["caldera.outputs"].split(";")][:n_out]
        with torch.no_grad():
            program = torch.onnx.export(job.module, (job.example,), dynamo=True, input_names=["x"],
                                        output_names=names, dynamic_shapes=job.dynamic_shapes(), verbose=False,
                                        report=False)  # fmt: skip
        for key, value in job.metadata.items():  # readable by any ONNX tool (onnx.load(...).metadata_props)
            program.model.metadata_props[key] = value
        return _atomically(path, lambda tmp: program.save(str(tmp), external_data=False))

    def load(self, path: Path, job: Job) -> Callable[[torch.Tensor], Any]:
        ort = require("onnxruntime", self.name)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> Any:
            outs = [torch.from_numpy(o) for o in session.run(None, {name: x.cpu().numpy()})]
            return _single(outs)

        return run


FORMATS = ("safetensors", "torchscript", "pt2", "onnx")


def aoti_configs(threads: int | None) -> dict[str, Any]:
    """Inductor options for a CPU package compiled for ``threads`` threads per call (None: the caller's pool, and
    only freezing).

    Compile with them under ``torch.no_grad()`` (AOTInductor.export does): inductor ignores ``freezing`` when grad
    mode is on. Measured here, batch 1, 1 thread, from C++ (docs/benchmarks.md, "CPU inference: what helps"):
    - max_autotune + CPP GEMM backend: inductor's own C++ GEMM where it beats ATen's addmm (no dispatcher trip per
      layer); closure MLP 4.4 -> 1.3 us with cpp.threads;
    - cpp.threads: OpenMP thread count fixed at compile time, so no parallel region (a futex) per kernel;
    - freezing: weights become constants, so convolutions are packed for oneDNN (mkldnn._convolution_pointwise,
      channels-last, GELU fused) instead of ATen's im2col path: heat U-Net 723 -> 569 us (1.27x) from C++.
    Tried and not kept (within 2 %, U-Net): an explicit channels-last input (layout_optimization already does it),
    memory_planning, aot_inductor.allow_stack_allocation, rewriting 2x2/stride-2 transposed convolutions as a 1x1
    convolution + pixel_shuffle (4 % slower: the transposed ones stay ATen either way, dynamic batch)."""
    if threads is None:  # the caller's thread pool; freezing still packs the weights for oneDNN
        return {"freezing": True}
    return {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": "ATEN,CPP",
        "cpp.threads": threads,
    }


def artefacts(formats: list[str], device: str = "cpu", threads: int | None = None) -> list[Format]:
    """The artefacts the user-facing ``formats`` make, in order; a name not in FORMATS is a ConfigError."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--format {','.join(unknown)}: unknown; choose from {','.join(FORMATS)}")
    out: list[Format] = []
    for name in FORMATS:  # a fixed order: pt2's ExportedProgram is made once and reused by AOTInductor
        if name not in formats:
            continue
        if name == "safetensors":
            out.append(Safetensors())
        elif name == "torchscript":
            out.append(TorchScript())
        elif name == "onnx":
            out.append(Onnx())
        else:
            out += [ExportedProgram(), AOTInductor("cpu", threads)]
            if device != "cpu":
                out.append(AOTInductor(device))
    return out


# -- why an export failed, in one line -----------------------------------------------------------------------------
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')
_OP = re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|torch\.[A-Za-z0-9_.]+)")


def blocker(exc: BaseException, differentiates: bool = False) -> str:
    """The operation that stopped an export, from torch's error (and whether the model calls autograd inside)."""
    if differentiates:
        return ("torch.autograd.grad inside forward (the model differentiates its own output, e.g. forces = -dE/dx); "
                "the exporters trace inference graphs without autograd: use the eager model or safetensors weights")  # fmt: skip
    text = "\n".join(str(e) for e in _chain(exc))
    where = ""
    user = [m for m in _FRAME.finditer(text) if "site-packages" not in m[1] and "/torch/" not in m[1]]
    if user:
        f = user[-1]
        where = f" at {Path(f[1]).name}:{f[2]} in {f[3]}: `{f[4].strip()}`"
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        return f"data-dependent control flow (a Python branch on a tensor's value){where}"
    if "Unsupported" in type(exc).__name__ or text.startswith("Unsupported"):
        return f"{text.splitlines()[0][:200]}{where}"
    ops = [m for m in _OP.findall(text) if not m.startswith(("torch._", "torch.export", "torch.onnx"))]
    head = " ".join(text.split())[:200]
    return f"{ops[0]}{where}: {head}" if ops else f"{type(exc).__name__}{where}: {head}"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out
