"""Wide (uint16) activation grids: quant-fallback{to=int16} keeps int8 weights and integer kernels, more levels."""

import numpy as np
import pytest
import torch

import tiny_models
from slimc import data, interpreter
from slimc.pass_manager import PassContext, PassInput, PassManager
from slimc.frontend.torch import from_torch
from slimc.passes.quant.qdq import int8_nodes
from slimc.passes.quant.scheme import widened_qparams
from slimc.passes.quant.wide import SUM_LIMIT, WIDE_MIN_BITS, group_qmax, widen, _group, _pair

CALIB = "calibrate{method=minmax,cache=false},quantize"


def resolve_native_dot() -> str | None:
    from slimc.targets.triple import resolve

    return resolve("native").int8_dot


def sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    """Output SQNR in dB (inf: exact)."""
    with np.errstate(divide="ignore"):
        return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - x).astype(np.float64) ** 2).sum()))


@pytest.fixture(scope="module")
def setup():
    """QuantNet (every int8 path) with a static batch of 1, the QDQ graph and 48 calibration inputs."""
    x = np.random.default_rng(1).standard_normal((48, 3, 32, 32)).astype(np.float32)
    g = from_torch(tiny_models.quant_net(), (torch.from_numpy(x[:1]),), name="qnet")
    g, _ = PassManager("canonicalize,fold-bn,fuse-act").run(g)
    q, _ = PassManager(CALIB, context=PassContext(calib=data.from_arrays([x]))).run(g)
    return g, q, x


def test_widened_grid_holds_the_old_range_with_one_zero_point():
    for scale, zp in [(np.float32(4 / 255), np.uint8(64)), (np.float32(0.01), np.uint8(0)),
                      (np.array([0.01, 0.5, 3e-4], np.float32), np.array([7, 7, 7], np.uint8))]:
        for qmax in (1023, 4095, 65535):
            s, z = widened_qparams(scale, zp, qmax)
            assert z.dtype == np.uint16 and s.dtype == np.float32 and s.shape == np.shape(scale)
            assert len(set(np.ravel(z).tolist())) == 1
            lo_old, hi_old = -np.float64(zp) * scale, (255 - np.float64(zp)) * scale
            lo, hi = -z.astype(np.float64) * s, (qmax - z.astype(np.float64)) * s
            assert np.all(lo <= lo_old + 1e-12) and np.all(hi >= hi_old - 1e-12)
            assert np.all(hi - lo <= (hi_old - lo_old) * (1 + 2.0 ** -5))  # not much wider: the levels are finer
            k = np.arange(qmax + 1, dtype=np.float64)  # every (q - zp) * scale exact in float32 (FMA-proof)
            for sc, zc in zip(np.ravel(s), np.broadcast_to(z, np.shape(s)).ravel() if np.ndim(s) else [z]):
                exact = (k - float(zc)) * float(sc)
                assert np.array_equal(exact.astype(np.float32).astype(np.float64), exact)


def test_levels_are_bounded_by_the_readers_int32_headroom(setup):
    _, q, _ = setup
    for n in int8_nodes(q, ("conv2d", "dense")):
        pair = _pair(q, n.inputs[0])
        qmax = group_qmax(q, _group(q, pair))
        w = q.weight(q.producer(n.inputs[1]).inputs[0]).astype(np.int64)
        worst = np.abs(w.reshape(w.shape[0], -1)).sum(1).max()
        assert qmax == 0 or (qmax * worst < SUM_LIMIT and (qmax + 1) & qmax == 0 and qmax >= 2 ** WIDE_MIN_BITS - 1)
        assert qmax > 255  # QuantNet's layers are small enough for a wide grid


def test_widen_keeps_weights_and_narrows_the_error(setup):
    g, q, x = setup
    names = [n.name for n in int8_nodes(q)]
    w, widened = widen(q, names)
    assert widened and all(v > 255 for v in widened.values())
    zps = {n.inputs[2] for n in w.nodes if n.op == "quantize"}
    assert all(w.weight(z).dtype == np.uint16 for z in zps)  # every activation grid QuantNet's int8 nodes read
    assert [n.name for n in int8_nodes(w)] == names  # still int8 nodes, with the same int8 weights
    for n in int8_nodes(w, ("conv2d", "dense")):
        wq = w.producer(n.inputs[1])
        np.testing.assert_array_equal(w.weight(wq.inputs[0]), q.weight(q.producer(n.inputs[1]).inputs[0]))

    def grid_noise(m) -> dict:  # SQNR of each dequantized activation against the float value its quantize read
        seen: dict = {}
        interpreter.GraphModule(m)(torch.from_numpy(x[:4]),
                                   hook=lambda node, outs: seen.update(zip(node.outputs, outs)))
        seen[m.inputs[0][0]] = torch.from_numpy(x[:4])
        return {d.name: sqnr(seen[m.producer(d.inputs[0]).inputs[0]].numpy(), seen[d.name].numpy())
                for d in m.nodes if d.op == "dequantize" and not m.is_param(d.inputs[0])}

    narrow, wide = grid_noise(q), grid_noise(w)
    assert set(wide) == set(narrow) == set(widened)
    for v, qmax in widened.items():  # each extra bit is worth ~6 dB (a grid-preserving op's re-quantize is exact)
        assert wide[v] > narrow[v] + 6 * (np.log2(qmax + 1) - 8) - 3 or wide[v] == narrow[v] == np.inf, (v, qmax)


def test_int16_fallback_meets_the_floor_and_folds_to_integer_ops(setup):
    g, _, x = setup
    calib = "calibrate{method=minmax,cache=false},quantize{exclude=op:dense}"  # int8 weights of the convs only:
    q, _ = PassManager(calib, context=PassContext(calib=data.from_arrays([x]))).run(g)  # activations dominate

    def outs(m):  # the graph has a static batch of 1
        return np.concatenate([interpreter.run(m, [x[i:i + 1]])[0] for i in range(4)])

    floor = round(sqnr(outs(g), outs(q)) + 1, 1)  # int8 weights alone cap it ~2 dB higher
    # the budget is checked on the first 4 calibration inputs, the ones the floor was set on
    pipeline = f"{calib},quant-fallback{{sqnr_floor={floor},to=int16,samples=4,sensitivity_samples=4}},fold-qdq"
    out, records = PassManager(pipeline, context=PassContext(calib=data.from_arrays([x]))).run(g)
    fb, fold = records[-2].pass_stats, records[-1].pass_stats
    assert fb["met"] and fb["to"] == "int16" and fb["fallback"] and fb["after"]["output_sqnr_db"] >= floor
    gains = fb["widening_gain_db"]  # the node whose widening alone gains most goes first
    assert fb["fallback"][0] == max(gains, key=gains.get) and gains[fb["fallback"][0]] > 0
    assert fb["int16_mac_share"] > 0 and abs(fb["int8_mac_share"] + fb["int16_mac_share"] - 0.9999) < 1e-3  # - dense
    assert not any(n.op == "conv2d" for n in out.nodes)  # every conv still integer
    assert fold["int16_mac_share"] > 0 and abs(fold["int8_mac_share"] + fold["int16_mac_share"] - 0.9999) < 1e-3
    assert any(out.type_of(n.inputs[0]).dtype == "uint16" for n in out.nodes if n.op == "qconv2d")
    assert sqnr(outs(g), outs(out)) >= floor - 0.1  # folded: the same arithmetic


def test_int16_then_float_ladder_floats_the_weight_limited_layers(setup):
    g, q, x = setup
    ctx = lambda: PassContext(calib=data.from_arrays([x]))  # noqa: E731

    def outs(m):  # the graph has a static batch of 1
        return np.concatenate([interpreter.run(m, [x[i:i + 1]])[0] for i in range(4)])

    all_wide = widen(q, [n.name for n in int8_nodes(q)])[0]  # what int16 alone can reach: int8 weights cap it
    floor = round(sqnr(outs(g), outs(all_wide)) + 3, 1)
    pipeline = f"{CALIB},quant-fallback{{sqnr_floor={floor},to=int16+float,samples=4,sensitivity_samples=4}},fold-qdq"
    out, records = PassManager(pipeline, context=ctx()).run(g)
    fb, fold = records[-2].pass_stats, records[-1].pass_stats
    names = [n.name for n in int8_nodes(q)]
    assert fb["met"] and fb["to"] == "int16+float" and sorted(fb["fallback"]) == sorted(names)
    gains = fb["float_gain_db"]  # ranked on the all-widened model: the layer whose float weights gain most first
    assert set(gains) == set(names) and fb["float"] and fb["float"][0] == max(gains, key=gains.get)
    tried = {(t["nodes"], t["in_float"]): t for t in fb["tried"]}
    assert not tried[(len(names), 0)]["output_sqnr_db"] >= floor  # every node widened was tried first and missed
    assert (len(names), len(fb["float"])) in tried and fb["after"]["output_sqnr_db"] >= floor
    assert fb["int16_mac_share"] > 0 and fb["int8_mac_share"] == 0  # what stays integer reads 16-bit activations
    assert fold["int16_mac_share"] == fb["int16_mac_share"] and fold["int8_mac_share"] == 0
    floated = {n.name for n in out.nodes if n.op in ("conv2d", "dense", "add")}
    assert floated == set(fb["float"])  # exactly the float steps left integer arithmetic
    assert sqnr(outs(g), outs(out)) >= floor - 0.1  # folded: the same arithmetic


def test_fallback_rejects_an_unknown_target(setup):
    from slimc.errors import PipelineError

    g, q, x = setup
    with pytest.raises(PipelineError, match="to='int4' is none of float"):
        PassManager("quant-fallback{sqnr_floor=40,to=int4}", context=PassContext(
            calib=data.from_arrays([x]), inputs_of={"quantize": PassInput(g)})).run(q)


def test_onnx_export_names_the_16_bit_layer(setup, tmp_path):
    from slimc import export
    from slimc.errors import SlimcError

    g, q, _ = setup
    w, _ = widen(q, [n.name for n in int8_nodes(q)])
    folded, _ = PassManager("fold-qdq").run(w)
    with pytest.raises(SlimcError, match=r"qconv2d\).*uint16 operand has no ONNX integer conv"):
        export.to_onnx(folded, str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.backend
def test_int16_layers_build_bit_exact(setup):
    import tvm
    from tvm import relax

    from slimc.targets.build import build
    from slimc.targets.triple import resolve

    _, q, x = setup
    w, widened = widen(q, [n.name for n in int8_nodes(q)][:3])  # a mixed u8 / u16 graph
    folded, _ = PassManager("fold-qdq").run(w)
    dtypes = {folded.type_of(n.inputs[0]).dtype for n in folded.nodes if n.op == "qconv2d"}
    assert dtypes == {"uint8", "uint16"}
    far = x[:1] * 50  # far beyond the calibrated ranges: clamped to each grid's top (qmax), never past the bound
    seen: dict = {}
    interpreter.GraphModule(w)(torch.from_numpy(far), hook=lambda node, outs: seen.update(zip(node.outputs, outs)))
    tops = [(int(seen[w.node(d).inputs[0]].int().max()), qmax) for d, qmax in widened.items()]
    assert all(top <= qmax for top, qmax in tops) and any(top == qmax < 65535 for top, qmax in tops), tops
    np.testing.assert_allclose(interpreter.run(folded, [far])[0], interpreter.run(w, [far])[0], rtol=1e-3, atol=1e-3)
    for triple in ("native", "x86-avx2"):
        r = build(folded, resolve(triple), trials=0, progress=False)
        for inp in (x[:1], far):
            got = relax.VirtualMachine(r.executable, tvm.cpu())["main"](tvm.runtime.tensor(inp)).numpy()
            np.testing.assert_array_equal(got, interpreter.run(folded, [inp])[0])


@pytest.mark.backend
@pytest.mark.skipif(resolve_native_dot() != "vnni", reason="host CPU has no AVX-512 VNNI")
def test_int16_layers_run_two_vpdpbusd_convs(setup, tmp_path):
    """x = 256 * hi + lo: a wide conv is two u8 x s8 VNNI convs, bit-exact against the interpreter."""
    import tvm
    from tvm import relax

    from slimc.targets.asm import count_int8_dot
    from slimc.targets.build import build
    from slimc.targets.lower import lower
    from slimc.targets.triple import resolve
    from slimc.targets.tune import prepare

    _, q, x = setup
    counts = {}
    for wide in (False, True):
        g = widen(q, [n.name for n in int8_nodes(q)])[0] if wide else q
        folded, _ = PassManager("fold-qdq").run(g)
        r = build(folded, resolve("native"), trials=0, progress=False)
        got = relax.VirtualMachine(r.executable, tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
        np.testing.assert_array_equal(got, interpreter.run(folded, [x[:1]])[0])
        lib = str(tmp_path / f"m{wide}.so")
        r.executable.export_library(lib)
        counts[wide] = count_int8_dot(lib, resolve("native"))["vpdpbusd"]
    assert counts[True] > counts[False] > 0, counts
    # the bytes of a wide input come from one kernel per conv (both planes, padded), not a shift and a mask pass each
    target = resolve("native")
    kernels = [gv.name_hint for gv in prepare(lower(folded, target), target.tvm()).functions]
    dot = [folded.type_of(n.inputs[0]).shape[1] for n in folded.nodes if n.op in ("qconv2d", "qdense")
           and folded.type_of(n.inputs[0]).dtype == "uint16" and n.attrs.get("groups", 1) == 1]
    assert sum(k.startswith("byte_planes") for k in kernels) == sum(c % 4 == 0 for c in dot) > 0
    # (a conv whose channels are padded to 4 lanes splits its bytes before that padding: two small kernels)
    assert sum("right_shift" in k for k in kernels) == sum(c % 4 != 0 for c in dot)


def test_near_dead_channels_get_a_weight_scale_their_int32_bias_fits(setup):
    _, q, x = setup
    conv = int8_nodes(q, ("conv2d",))[1]
    wdq = q.producer(conv.inputs[1])
    xs, ws = float(q.weight(q.producer(conv.inputs[0]).inputs[1])), q.weight(wdq.inputs[1])
    bias = q.weight(conv.inputs[2]).copy()
    bias[0] = 2.0 ** 29 * xs * float(ws[0])  # fits int32 on the u8 grid, 2^8 times too large on a 16-bit one
    from slimc.rewrite import Edit

    e = Edit(q)
    e.set_param(conv.inputs[2], bias)
    q = e.apply()
    w, widened = widen(q, [conv.name])
    assert widened
    new_ws = w.weight(w.producer(conv.inputs[1]).inputs[1])
    assert new_ws[0] > ws[0] and np.array_equal(new_ws[1:], ws[1:])  # only the near-dead channel
    folded, _ = PassManager("fold-qdq").run(w)
    layer = folded.node(conv.name) if conv.name in {n.name for n in folded.nodes} else \
        next(n for n in folded.nodes if n.op == "qconv2d" and n.inputs[1].startswith(wdq.inputs[0]))
    assert layer.op == "qconv2d" and folded.type_of(layer.inputs[0]).dtype == "uint16"
    assert np.abs(folded.weight(layer.inputs[2]).astype(np.int64)).max() < 2 ** 31 - 2 ** 29


def test_wide_integer_graph_round_trips_through_slimc_files_and_pt2(setup, tmp_path):
    from slimc import export, ir

    _, q, x = setup
    folded, _ = PassManager("fold-qdq").run(widen(q, [n.name for n in int8_nodes(q)])[0])
    ir.save(folded, tmp_path / "m.slimc")
    assert ir.load(tmp_path / "m.slimc") == folded
    assert ir.parse_graph(ir.print_graph(folded)).value_types == folded.value_types  # u16 in the text form
    export.to_pt2(folded, tmp_path / "m.pt2")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    np.testing.assert_array_equal(ep.module()(torch.from_numpy(x[:1])).numpy(), interpreter.run(folded, [x[:1]])[0])
