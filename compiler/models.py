"""Resolves a MODEL argument (.onnx, .pt2, .slimc, module:callable, torchvision:name) to an IR graph plus its oracle."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slimc.errors import FrontendError, ShapeError
from slimc.ir import Graph

Oracle = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
DEFAULT_SHAPE = (1, 3, 224, 224)


@dataclass(frozen=True)
class LoadedModel:
    """An imported graph and the reference that judges it (PyTorch eager, ONNX Runtime, or the IR itself)."""

    spec: str
    graph: Graph
    oracle: Oracle
    oracle_name: str
    sample: tuple[np.ndarray, ...] | None = None  # real inputs (photos) for models that declare a preprocessing


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224), with a clear error for anything else."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
        raise ShapeError(f"--input-shape {text!r} is not a list of positive integers such as 1,3,224,224")
    return tuple(int(p) for p in parts)


def load_model(spec: str, input_shapes: Sequence[tuple[int, ...]] | None = None,
               dynamic_batch: bool = False) -> LoadedModel:
    """Import MODEL through the matching frontend and pair it with the oracle that checks every pass."""
    if spec.startswith("torchvision:"):
        return _from_module(spec, _torchvision(spec.split(":", 1)[1]), input_shapes, dynamic_batch)
    low = spec.lower()
    if low.endswith((".onnx", ".pt2", ".slimc")):
        if not os.path.isfile(spec):
            raise FrontendError(f"model file {spec} does not exist (or is not a file); check the path")
        if low.endswith(".onnx"):
            return _from_onnx(spec, input_shapes)
        if low.endswith(".pt2"):
            return _from_pt2(spec)
        return _from_slimc(spec, input_shapes)
    if ":" in spec:
        return _from_module(spec, _callable(spec), input_shapes, dynamic_batch)
    raise FrontendError(f"cannot tell what model {spec!r} is: pass a .onnx, .pt2 or .slimc file, "
                        "'package.module:callable' returning an nn.Module, or 'torchvision:<name>'")


def _torchvision(name: str):
    import torch
    import torchvision

    builders = set(torchvision.models.list_models(module=torchvision.models))
    if name not in builders:
        raise FrontendError(f"torchvision has no classification model {name!r}; try one of: "
                            f"{', '.join(sorted(builders)[:40])}, ...")
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def _callable(spec: str):
    import torch

    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory are importable
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise FrontendError(f"cannot import module {mod_name!r} for model {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FrontendError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise FrontendError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _from_module(spec: str, module, input_shapes, dynamic_batch: bool) -> LoadedModel:
    import torch

    from slimc.frontend.torch import from_torch

    shapes = list(input_shapes or [getattr(module, "slimc_input_shape", DEFAULT_SHAPE)])
    args = tuple(torch.randn(*s) for s in shapes)
    name = spec.split(":")[-1].split(".")[-1]
    graph = from_torch(module, args, dynamic_batch=dynamic_batch, name=name)

    def oracle(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.asarray(x)) for x in inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in outs]

    sample = None
    preprocess = getattr(module, "slimc_preprocess", None)
    if preprocess is not None and len(shapes) == 1 and len(shapes[0]) == 4:
        from slimc.zoo import sample_images

        n, _, h, _ = shapes[0]
        sample = (sample_images(n, size=h, preprocess=preprocess),)
    return LoadedModel(spec, graph, oracle, "PyTorch eager", sample)


def _from_onnx(path: str, input_shapes) -> LoadedModel:
    from slimc.frontend.onnx import from_onnx

    graph = from_onnx(path, list(input_shapes) if input_shapes else None)
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise FrontendError(f"ONNX Runtime cannot load {path} to serve as the reference: {e}") from None
    names = [i.name for i in sess.get_inputs()]

    def oracle(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(sess.run(None, dict(zip(names, inputs))))

    return LoadedModel(path, graph, oracle, "ONNX Runtime")


def _from_pt2(path: str) -> LoadedModel:
    import torch

    from slimc.frontend.torch import load_pt2

    graph = load_pt2(path)
    module = torch.export.load(path).module()

    def oracle(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.asarray(x)) for x in inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in outs]

    return LoadedModel(path, graph, oracle, "PyTorch (.pt2)")


def _from_slimc(path: str, input_shapes=None) -> LoadedModel:
    from slimc import interpreter, ir
    from slimc.rewrite import with_input_shapes

    graph = ir.load(path)
    if input_shapes:  # e.g. batch 1 for a graph saved with a symbolic batch
        graph = with_input_shapes(graph, list(input_shapes))
    return LoadedModel(path, graph, lambda inputs: interpreter.run(graph, list(inputs)), "slimc IR (as saved)")
