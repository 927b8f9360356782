"""Acceptance over the torchvision zoo: torch frontend -> passes -> ONNX exporter, each checked against PyTorch eager."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from slimc import export, interpreter
from slimc.frontend.torch import from_torch
from slimc.pass_manager import compare, PassManager

ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
       "densenet121", "squeezenet1_1", "regnet_y_400mf", "convnext_tiny"]
TOL = 1e-4  # max abs error relative to the reference output's range


def _randomize_norms(model: torch.nn.Module) -> None:
    """Give BN/LN non-trivial statistics so that folding mistakes show up in the numbers."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_through_pipeline_and_onnx_export(name, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = [model(x).numpy()]
    graph = from_torch(model, (x,))
    final, records = PassManager("canonicalize,fold-bn,fuse-act").run(graph)
    inputs = [x.numpy()]
    assert compare(interpreter.run(graph, inputs), ref).max_rel <= TOL
    assert compare(interpreter.run(final, inputs), ref).max_rel <= TOL
    ops = records[-1].stats.op_counts
    if name != "densenet121":  # DenseNet's batch norms follow concats: nothing to fold into
        assert "batch_norm" not in ops
    assert records[-1].stats.macs == records[0].stats.macs
    path = tmp_path / f"{name}.onnx"
    export.to_onnx(final, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: inputs[0]})
    assert compare(out, ref).max_rel <= TOL
