"""canonicalize,fold-bn,fuse-act through PassManager: a ResNet-like graph, and random conv/bn/act chains."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimc import interpreter
from slimc.pass_manager import Instruments, PassManager, compare
from test_pass_rewrite import assert_same, build, ops_of, snapshot

PIPELINE = "canonicalize,fold-bn,fuse-act"


def bn(name: str, x: str, c: int, hw: int) -> str:
    return (f"%{name}: f32[N,{c},{hw},{hw}] = batch_norm(%{x}, %{name}.gamma, %{name}.beta, %{name}.mean, "
            f"%{name}.var)")


def bn_params(name: str, c: int) -> str:
    return "\n".join(f"param %{name}.{p}: f32[{c}]" for p in ("gamma", "beta", "mean", "var"))


RESNET = "\n".join([
    "graph @resnet_ish(%x: f32[N,3,16,16]) {",
    "param %stem.w: f32[8,3,3,3]", bn_params("stem.bn", 8),
    "param %b1.w1: f32[8,8,3,3]", bn_params("b1.bn1", 8), "param %b1.w2: f32[8,8,3,3]", bn_params("b1.bn2", 8),
    "param %b2.w1: f32[16,8,3,3]", bn_params("b2.bn1", 16), "param %b2.w2: f32[16,16,3,3]",
    bn_params("b2.bn2", 16), "param %b2.wd: f32[16,8,1,1]", bn_params("b2.bnd", 16),
    "param %fc.w: f32[10,16]", "param %fc.b: f32[10]",
    '%stem: f32[N,8,16,16] = conv2d(%x, %stem.w) {padding=[1,1,1,1]} loc("conv1")',
    bn("stem.bn", "stem", 8, 16),
    "%stem.relu: f32[N,8,16,16] = relu(%stem.bn)",
    "%pool: f32[N,8,8,8] = max_pool2d(%stem.relu) {kernel=[2,2], stride=[2,2]}",
    "%b1.c1: f32[N,8,8,8] = conv2d(%pool, %b1.w1) {padding=[1,1,1,1]}", bn("b1.bn1", "b1.c1", 8, 8),
    "%b1.r1: f32[N,8,8,8] = clip(%b1.bn1) {min=0.0}",
    "%b1.c2: f32[N,8,8,8] = conv2d(%b1.r1, %b1.w2) {padding=[1,1,1,1]}", bn("b1.bn2", "b1.c2", 8, 8),
    "%b1.add: f32[N,8,8,8] = add(%b1.bn2, %pool)",
    "%b1.out: f32[N,8,8,8] = relu(%b1.add)",
    "%b2.c1: f32[N,16,4,4] = conv2d(%b1.out, %b2.w1) {stride=[2,2], padding=[1,1,1,1]}",
    bn("b2.bn1", "b2.c1", 16, 4),
    "%b2.r1: f32[N,16,4,4] = relu(%b2.bn1)",
    "%b2.c2: f32[N,16,4,4] = conv2d(%b2.r1, %b2.w2) {padding=[1,1,1,1]}", bn("b2.bn2", "b2.c2", 16, 4),
    "%b2.cd: f32[N,16,4,4] = conv2d(%b1.out, %b2.wd) {stride=[2,2]}", bn("b2.bnd", "b2.cd", 16, 4),
    "%b2.add: f32[N,16,4,4] = add(%b2.bn2, %b2.bnd)",
    "%b2.out: f32[N,16,4,4] = relu(%b2.add)",
    "%gap: f32[N,16,1,1] = global_avg_pool(%b2.out)",
    "%flat: f32[N,16] = flatten(%gap)",
    "%drop: f32[N,16] = dropout(%flat)",
    "%logits: f32[N,10] = dense(%drop, %fc.w, %fc.b)",
    "return %logits",
    "}",
])


def test_resnet_like_pipeline_removes_every_batch_norm():
    g = build(RESNET)
    snap = snapshot(g)
    x = interpreter.example_inputs(g, batch=2)
    ref = interpreter.run(g, x)
    pm = PassManager(PIPELINE, Instruments(reference=(x, ref)))
    out, records = pm.run(g)
    assert_same(g, snap)
    assert "batch_norm" not in ops_of(out)
    assert ops_of(out).count("conv2d") == 6 and ops_of(out).count("relu") == 2  # the relus after the adds
    assert sorted(n.attrs["act"] for n in out.nodes if n.op == "conv2d") == ["none"] * 3 + ["relu"] * 3
    assert out.outputs == ("logits",) and out.node("stem").source == ("conv1", "stem.bn", "stem.relu")
    steps = {r.name: r for r in records}
    assert steps["fold-bn"].pass_stats == {"folded": 6, "unfolded": 0, "unfolded_reasons": {}}
    assert steps["fuse-act"].pass_stats["fused"] == 3
    assert steps["canonicalize"].pass_stats["noop"] == 1 and steps["canonicalize"].pass_stats["relu"] == 1
    assert all(r.fidelity.max_rel <= 1e-5 for r in records)
    _, again = PassManager(PIPELINE).run(out)
    assert not any(r.changed for r in again)


# ---- random chains -------------------------------------------------------------------------------

ACTS = ["relu", "relu6", "clip(0,6)", "clip(-1,1)", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu",
        "x*sigmoid(x)"]

conv = st.tuples(st.just("conv"), st.sampled_from([4, 6]), st.sampled_from([1, 3]), st.booleans(), st.booleans(),
                 st.sampled_from(["none", "none", "relu"]))
layer = st.one_of(
    conv,
    st.tuples(st.just("block"), conv, st.sampled_from(ACTS)),  # conv, batch_norm, activation
    st.just(("bn",)),
    st.tuples(st.just("act"), st.sampled_from(ACTS)),
    st.sampled_from([("identity",), ("dropout",), ("reshape",), ("flatten_round_trip",), ("residual",)]),
)


class ChainBuilder:
    """Writes a chain of layers as IR text, tracking the current value and channel count."""

    def __init__(self, channels: int, hw: int) -> None:
        self.c, self.hw, self.cur, self.k = channels, hw, "x", 0
        self.params: list[str] = []
        self.lines: list[str] = []

    def t(self, c: int | None = None) -> str:
        return f"f32[N,{self.c if c is None else c},{self.hw},{self.hw}]"

    def emit(self, expr: str, ty: str | None = None) -> str:
        self.k += 1
        name = f"v{self.k}"
        self.lines.append(f"%{name}: {ty or self.t()} = {expr}")
        self.cur = name
        return name

    def param(self, shape: str, suffix: str = "") -> str:
        name = f"p{len(self.params)}{suffix}"
        self.params.append(f"param %{name}: f32[{shape}]")
        return name

    def add(self, spec: tuple) -> None:
        kind, x = spec[0], self.cur
        if kind == "conv":
            _, cout, k, depthwise, bias, act = spec
            groups = self.c if depthwise else 1
            cout = self.c if depthwise else cout
            w = self.param(f"{cout},{self.c // groups},{k},{k}")
            b = f", %{self.param(str(cout))}" if bias else ""
            p = (k - 1) // 2
            act_attr = f', act="{act}"' if act != "none" else ""
            self.emit(f"conv2d(%{x}, %{w}{b}) {{groups={groups}, padding=[{p},{p},{p},{p}]{act_attr}}}",
                      self.t(cout))
            self.c = cout
        elif kind == "block":
            for part in (spec[1], ("bn",), ("act", spec[2])):
                self.add(part)
        elif kind == "bn":
            names = [self.param(str(self.c), suffix) for suffix in ("gamma", "beta", "mean", "var")]
            self.emit(f"batch_norm(%{x}, {', '.join('%' + n for n in names)})")
        elif kind == "act":
            self.add_act(spec[1], x)
        elif kind in ("identity", "dropout"):
            self.emit(f"{kind}(%{x})")
        elif kind == "reshape":
            self.emit(f"reshape(%{x}) {{shape=[0,{self.c},{self.hw},-1]}}")
        elif kind == "flatten_round_trip":
            f = self.emit(f"flatten(%{x})", f"f32[N,{self.c * self.hw * self.hw}]")
            self.emit(f"reshape(%{f}) {{shape=[-1,{self.c},{self.hw},{self.hw}]}}")
        elif kind == "residual":
            r = self.emit(f"relu(%{x})")
            self.emit(f"add(%{x}, %{r})")

    def add_act(self, act: str, x: str) -> None:
        if act == "clip(0,6)":
            self.emit(f"clip(%{x}) {{min=0.0, max=6.0}}")
        elif act == "clip(-1,1)":
            self.emit(f"clip(%{x}) {{min=-1.0, max=1.0}}")
        elif act == "x*sigmoid(x)":
            s = self.emit(f"sigmoid(%{x})")
            self.emit(f"mul(%{x}, %{s})")
        else:
            self.emit(f"{act}(%{x})")

    def text(self) -> str:
        body = "\n".join(f"  {ln}" for ln in self.params + self.lines)
        return f"graph @chain(%x: f32[N,4,{self.hw},{self.hw}]) {{\n{body}\n  return %{self.cur}\n}}\n"


EXAMPLES = int(os.environ.get("SLIMC_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a longer local hunt


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(layer, min_size=1, max_size=8), hw=st.sampled_from([3, 5]), seed=st.integers(0, 2**16))
def test_random_chains_keep_their_outputs(layers, hw, seed):
    b = ChainBuilder(4, hw)
    for spec in layers:
        b.add(spec)
    g = build(b.text(), seed=seed)
    snap = snapshot(g)
    x = interpreter.example_inputs(g, seed=seed, batch=2)
    out, records = PassManager(PIPELINE).run(g)
    assert_same(g, snap)
    assert compare(interpreter.run(out, x), interpreter.run(g, x)).max_rel <= 1e-5
    foldable = sum(1 for i, s in enumerate(layers) if s == ("bn",) and i > 0 and layers[i - 1][0] == "conv"
                   and layers[i - 1][5] == "none")
    assert records[2].pass_stats["folded"] >= foldable
    assert not {"identity", "dropout", "flatten"} & set(ops_of(out))
    _, again = PassManager(PIPELINE).run(out)
    assert not any(r.changed for r in again)
