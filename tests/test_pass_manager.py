"""Pass manager: pipeline text, option validation, instruments (verify, numeric check, dumps, reproducer)."""

import io
import json
import os

import numpy as np
import pytest

from slimc import interpreter, ir
from slimc.errors import PipelineError
from slimc.pass_manager import (
    PASSES, Instruments, PassManager, PassResult, compare, format_pipeline, opt, parse_pipeline, register_pass,
)

TEXT = """\
graph @small(%x: f32[1,3,8,8]) {
  param %w: f32[4,3,3,3]
  param %g: f32[4]
  param %be: f32[4]
  param %m: f32[4]
  param %v: f32[4]
  %c: f32[1,4,8,8] = conv2d(%x, %w) {padding=[1,1,1,1]}
  %bn: f32[1,4,8,8] = batch_norm(%c, %g, %be, %m, %v)
  %i: f32[1,4,8,8] = identity(%bn)
  %r: f32[1,4,8,8] = relu(%i)
  return %r
}
"""


def small() -> ir.Graph:
    g = ir.parse_graph(TEXT)
    rng = np.random.default_rng(1)
    w = {k: rng.standard_normal(t.shape).astype("float32") for k, t in g.param_types.items()}
    w["v"] = np.abs(w["v"]) + 0.5
    return g.replace(weights=w)


if "test-broken" not in PASSES:
    @register_pass("test-broken", why=opt(str, "boom"))
    def _broken(graph, ctx):
        """A pass that fails, to exercise the reproducer."""
        raise RuntimeError(ctx.options["why"])

    @register_pass("test-bad-types")
    def _bad_types(graph, ctx):
        """A pass that returns an ill-typed graph, to exercise verify-after-each."""
        n = graph.nodes[0]
        bad = n.replace(out_types=(n.out_types[0].with_shape((1, 5, 8, 8)),))
        return PassResult(graph.with_nodes((bad,) + graph.nodes[1:]), True)


def test_parse_and_print_canonical():
    specs = parse_pipeline(" canonicalize , fold-bn,fuse-act ")
    assert format_pipeline(specs) == "canonicalize,fold-bn,fuse-act"
    assert [s.name for s in specs] == ["canonicalize", "fold-bn", "fuse-act"]
    assert parse_pipeline("") == []


def test_options_are_typed():
    specs = parse_pipeline("test-broken{why=x}")
    assert specs[0].options == {"why": "x"}
    assert format_pipeline(specs) == "test-broken{why=x}"


def test_unknown_pass_lists_available():
    with pytest.raises(PipelineError, match="unknown pass 'frobnicate'.*canonicalize"):
        parse_pipeline("canonicalize,frobnicate")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(PipelineError, match="has no option 'nope'.*why: str"):
        parse_pipeline("test-broken{nope=1}")


def test_malformed_pipeline():
    with pytest.raises(PipelineError):
        parse_pipeline("canonicalize{")
    with pytest.raises(PipelineError, match="needs a value"):
        parse_pipeline("test-broken{why}")


def test_run_with_numeric_check_and_dump(tmp_path):
    g = small()
    x = interpreter.example_inputs(g)
    ref = interpreter.run(g, x)
    out = io.StringIO()
    pm = PassManager("canonicalize,fold-bn,fuse-act",
                     Instruments(reference=(x, ref), dump_dir=str(tmp_path / "d"), print_changed=True, stream=out))
    final, records = pm.run(g)
    assert [r.name for r in records] == ["input", "canonicalize", "fold-bn", "fuse-act"]
    assert all(r.fidelity.max_rel < 1e-5 for r in records)
    assert [n.op for n in final.nodes] == ["conv2d"]
    assert records[-1].stats.nodes == 1 and records[0].stats.nodes == 4
    assert records[0].stats.macs == 4 * 8 * 8 * 3 * 9
    for step in ("00_input", "01_canonicalize", "02_fold-bn", "03_fuse-act"):
        for f in ("ir.txt", "diff.txt", "model.onnx", "graph.dot", "stats.json"):
            assert (tmp_path / "d" / step / f).is_file(), (step, f)
    diff = (tmp_path / "d" / "02_fold-bn" / "diff.txt").read_text()
    assert "-  %bn" in diff
    assert json.loads((tmp_path / "d" / "03_fuse-act" / "stats.json").read_text())["stats"]["nodes"] == 1
    assert "IR after fuse-act" in out.getvalue()


def test_failing_pass_writes_reproducer(tmp_path):
    g = small()
    pm = PassManager("canonicalize,test-broken{why=kaput},fuse-act", Instruments(repro_dir=str(tmp_path)))
    with pytest.raises(PipelineError, match="kaput") as ei:
        pm.run(g)
    repro = [p for p in tmp_path.iterdir() if p.name.startswith("slimc-repro-")]
    assert len(repro) == 1 and str(repro[0]) in str(ei.value)
    assert (repro[0] / "pipeline.txt").read_text().strip() == "test-broken{why=kaput},fuse-act"
    replay = ir.load(repro[0] / "input.slimc")
    assert [n.op for n in replay.nodes] == ["conv2d", "batch_norm", "relu"]  # canonicalize already ran


def test_verify_after_each_catches_bad_pass(tmp_path):
    with pytest.raises(PipelineError, match="test-bad-types.*declared types"):
        PassManager("test-bad-types", Instruments(repro_dir=str(tmp_path))).run(small())


def test_dump_dir_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PipelineError, match="cannot write to dump dir"):
        PassManager("canonicalize", Instruments(dump_dir=str(blocker / "sub"))).run(small())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="not empty"):
        PassManager("canonicalize", Instruments(dump_dir=str(foreign))).run(small())
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_compare_metrics():
    ref = [np.array([0.0, 1.0, 2.0])]
    f = compare([np.array([0.0, 1.0, 2.5])], ref)
    assert f.max_abs == pytest.approx(0.5) and f.max_rel == pytest.approx(0.25)
    assert f.sqnr_db == pytest.approx(10 * np.log10(5 / 0.25))
    assert compare(ref, ref).sqnr_db == float("inf")
