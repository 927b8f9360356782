"""Load a compiled slimc artifact directory and run it on numpy inputs (needs only TVM's runtime)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimc.errors import SlimcError

LIB_NAME = "model.so"
META_NAME = "meta.json"


class ArtifactError(SlimcError):
    """An artifact directory is missing, incomplete, or built for another machine."""


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise ArtifactError(f"{path} is not a slimc artifact (no {META_NAME}); build one with `slimc compile`")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except ValueError as e:
        raise ArtifactError(f"{meta_path} is not valid JSON ({e}); rebuild the artifact") from None


@dataclass
class CompiledModel:
    """A loaded artifact: call `run(*arrays)` to get numpy outputs."""

    path: str
    meta: dict
    vm: object
    device: object
    lib: object  # the loaded library (its imports hold the compiled kernels)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    def _tensors(self, inputs: Sequence[np.ndarray]):
        import tvm

        specs = self.meta["inputs"]
        if len(inputs) != len(specs):
            raise ArtifactError(f"the model takes {len(specs)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        out = []
        for x, spec in zip(inputs, specs):
            x = np.ascontiguousarray(np.asarray(x, dtype=spec["dtype"]))
            if list(x.shape) != list(spec["shape"]):
                raise ArtifactError(f"input {spec['name']} expects shape {spec['shape']}, got {list(x.shape)}")
            out.append(tvm.runtime.tensor(x, self.device))
        return out

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        result = self.vm["main"](*self._tensors(inputs))
        items = list(result) if not hasattr(result, "numpy") else [result]
        return [r.numpy() for r in items]

    def set_inputs(self, *inputs: np.ndarray) -> None:
        """Stage inputs for `invoke_stateful` (used by latency measurement)."""
        self.vm.set_input("main", *self._tensors(inputs))


def load(path: str | os.PathLike[str]) -> CompiledModel:
    """Load an artifact directory written by `slimc compile` for this host."""
    import tvm
    from tvm import relax

    path = os.fspath(path)
    meta = read_meta(path)
    lib_path = os.path.join(path, LIB_NAME)
    if not os.path.isfile(lib_path):
        raise ArtifactError(f"{path} has no {LIB_NAME}; the artifact is incomplete, rebuild it")
    arch = os.uname().machine
    built_for = meta.get("target", {}).get("triple", "").split("-")[0]
    if built_for and built_for != arch:
        raise ArtifactError(f"{path} was built for {built_for}, this machine is {arch}; run it there "
                            "(or check it here with `slimc verify --qemu`)")
    lib = tvm.runtime.load_module(lib_path)
    dev = tvm.cpu()
    return CompiledModel(path, meta, relax.VirtualMachine(lib, dev), dev, lib)
