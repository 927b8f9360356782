"""The `slimc` command line, run as a user would: tables, dumps, and one-paragraph errors for bad input."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slimc(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimc.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def assert_clean_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("slimc: error: "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one paragraph
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


def conv_onnx(path, op_type="Relu", domain="", extra_opset=None, input_shape=(1, 3, 8, 8)) -> str:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node(op_type, ["c"], ["y"], name="act0", domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(path))
    return str(path)


def test_help_is_fast():
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "import sys; from slimc.cli import main; sys.exit(main(['--help']))"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "inspect" in p.stdout
    assert time.perf_counter() - t0 < 1.5
    p = subprocess.run([sys.executable, "-c", "import sys, slimc.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == "False"


def test_inspect_onnx_table_and_dump(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    p = slimc("inspect", model, "--dump-dir", str(tmp_path / "d"))
    assert p.returncode == 0, p.stderr
    assert "ONNX Runtime" in p.stdout and "fuse-act" in p.stdout
    assert "final ops: conv2d×1" in p.stdout
    assert (tmp_path / "d" / "03_fuse-act" / "model.onnx").is_file()


def test_inspect_json(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    p = slimc("inspect", model, "--json", "--passes", "canonicalize")
    data = json.loads(p.stdout)
    assert data["pipeline"] == "canonicalize" and data["steps"][-1]["fidelity"]["max_rel"] < 1e-5


def test_missing_file(tmp_path):
    assert_clean_error(slimc("inspect", str(tmp_path / "nope.onnx")), "nope.onnx")


def test_truncated_onnx(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    data = open(model, "rb").read()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    assert_clean_error(slimc("inspect", str(tmp_path / "t.onnx")), "t.onnx")


def test_not_onnx(tmp_path):
    (tmp_path / "x.onnx").write_text("this is not a protobuf\n" * 10)
    assert_clean_error(slimc("inspect", str(tmp_path / "x.onnx")), "x.onnx")


def test_unknown_onnx_op(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx", op_type="Det")
    assert_clean_error(slimc("inspect", model), "Det", "act0")


def test_custom_domain(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx", op_type="FancyAct", domain="com.example")
    assert_clean_error(slimc("inspect", model), "com.example", "FancyAct")


def test_external_data_outside_model_dir(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = onnx.load(conv_onnx(inner / "m.onnx"))
    (tmp_path / "secret.bin").write_bytes(np.zeros(4 * 3 * 3 * 3, np.float32).tobytes())
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", str(4 * 3 * 3 * 3 * 4))):
        w.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(model, str(inner / "ext.onnx"))
    assert_clean_error(slimc("inspect", str(inner / "ext.onnx")), "secret.bin")


def test_wrong_input_shape(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    assert_clean_error(slimc("inspect", model, "--input-shape", "1,4,8,8"), "input")
    assert_clean_error(slimc("inspect", model, "--input-shape", "1,three"), "--input-shape")
    assert_clean_error(slimc("inspect", "torchvision:resnet18", "--input-shape", "1,5,64,64"), "input")


def test_unknown_pass_and_option(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    assert_clean_error(slimc("inspect", model, "--passes", "canonicalize,frob"), "frob", "fold-bn")
    assert_clean_error(slimc("inspect", model, "--passes", "fold-bn{ratio=2}"), "ratio")


def test_unwritable_dump_dir(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    (tmp_path / "f").write_text("a file")
    assert_clean_error(slimc("inspect", model, "--dump-dir", str(tmp_path / "f" / "d")), "dump dir")


def test_export_failure_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    out = tmp_path / "out.onnx"
    assert_clean_error(slimc("export", str(bad), "-o", str(out)), "bad.onnx")
    assert not out.exists() and os.listdir(tmp_path) == ["bad.onnx"]


def test_export_round_trip(tmp_path):
    model = conv_onnx(tmp_path / "m.onnx")
    for ext in ("onnx", "pt2", "slimc"):
        out = tmp_path / f"out.{ext}"
        p = slimc("export", model, "-o", str(out))
        assert p.returncode == 0, p.stderr
        q = slimc("inspect", str(out), "--passes", "", "--json")
        assert q.returncode == 0, q.stderr
        assert json.loads(q.stdout)["steps"][0]["stats"]["macs"] == 4 * 8 * 8 * 27
