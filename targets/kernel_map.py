"""Which IR nodes each kernel of a built library computes, so a profile names the model's layers, not TVM symbols.

Records meet here, as module attributes. The lowering notes the IR node of every Relax binding it emits
(`ORIGINS`: binding name -> node); just before FuseOps, main's bindings are listed with what each computes from what
(`BINDINGS`). After FuseOps, each call in main of a fused function (or of a lone PrimFunc) collects the nodes of the
bindings it holds (`FUSED`); after FuseTIR those calls are the kernels (`KERNELS`: symbol and nodes, in call order).
At the end of the build, the kernels the VM really calls are matched with them in order: passes between may drop
whole kernels (a pure reshape becomes a VM builtin), never reorder them. A map that does not line up exactly is
dropped, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

ORIGINS = "slimc_origins"  # binding name -> IR node, set by the lowering
BINDINGS = "slimc_bindings"  # before FuseOps: [name, IR node, signature] of each binding of main, in order
FUSED = "slimc_fused_nodes"  # after FuseOps: the IR nodes of each kernel call of main, in order
KERNELS = "slimc_kernels"  # after FuseTIR: [symbol, nodes] of each kernel call of main, in order
UNKNOWN = "<unknown>"  # a value whose pre-fusion binding was not found: matches no signature


@dataclass(frozen=True)
class KernelNodes:
    """One kernel call of the built library, in VM call order, and the IR nodes it computes (in graph order)."""

    symbol: str
    nodes: tuple[str, ...]

    def to_json(self) -> dict:
        return {"symbol": self.symbol, "nodes": list(self.nodes)}


def _bindings(func) -> Iterable:
    for block in func.body.blocks:
        yield from block.bindings


def binding_origins(main, ends: Sequence[tuple[str, object]]) -> dict[str, str]:
    """Binding name -> IR node, from the last binding each node's lowering emitted (`ends`, in lowering order)."""
    origins: dict[str, str] = {}
    it = iter(ends)
    node, last = next(it, (None, None))
    for b in _bindings(main):
        if node is None:
            break
        origins[b.var.name] = node
        if b.var.same_as(last):
            node, last = next(it, (None, None))
    return origins


def _is_call_tir(call) -> bool:
    from tvm import ir

    return isinstance(call.op, ir.Op) and call.op.name == "relax.call_tir"


def _unique(seq: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(seq))


def _signature(value, name_of: Callable[[object], str]) -> str | None:
    """What a binding computes from what: its callee (PrimFunc or op) and its arguments, each named by `name_of`."""
    from tvm import ir, relax

    def arg(a) -> str:
        if isinstance(a, relax.Var):
            return name_of(a)
        return "<const>" if isinstance(a, ir.Constant) else "<other>"

    if isinstance(value, relax.Call):
        if _is_call_tir(value):
            return f"{value.args[0].name_hint}({', '.join(arg(a) for a in value.args[1].fields)})"
        callee = value.op.name if isinstance(value.op, ir.Op) else getattr(value.op, "name_hint", "<callee>")
        return f"{callee}({', '.join(arg(a) for a in value.args)})"
    if isinstance(value, relax.Tuple):
        return f"tuple({', '.join(arg(f) for f in value.fields)})"
    if isinstance(value, relax.TupleGetItem):
        return f"item{value.index}({arg(value.tuple_value)})"
    return None


def _handoff(name: str, src: str, dst: str, fn: Callable[[object, object], object | None]):
    """A module pass turning attribute `src` into `dst` = fn(mod, src's value); None from fn drops the map."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod, _ctx):
        if mod.attrs is None or src not in mod.attrs:
            return mod
        value = fn(mod, mod.attrs[src])
        mod = mod.without_attr(src)
        return mod if value is None else mod.with_attr(dst, value)

    return run


def note_bindings():
    """Module pass for just before FuseOps: main's bindings in order, each with its IR node and its signature."""
    return _handoff("SlimcNoteBindings", ORIGINS, BINDINGS, _binding_rows)


def note_fused_nodes():
    """Module pass for between FuseOps and FuseTIR: the IR nodes of each kernel call of main (attribute FUSED)."""
    return _handoff("SlimcNoteFusedNodes", BINDINGS, FUSED, _fused_nodes)


def name_kernels():
    """Module pass for after FuseTIR: pairs each call_tir of main with the nodes noted before (attribute KERNELS)."""
    return _handoff("SlimcNameKernels", FUSED, KERNELS, _named_kernels)


def _binding_rows(mod, origins) -> list | None:
    rows = [[b.var.name, str(origins.get(b.var.name, "")), _signature(b.value, lambda v: v.name) or ""]
            for b in _bindings(mod["main"])]
    # names that no longer tell bindings apart: no map rather than a wrong one
    return rows if len({name for name, _, _ in rows}) == len(rows) else None


def _fused_nodes(mod, binding_rows) -> list[list[str]]:
    """FuseOps moves a group of main's bindings into a function, binds its outputs to new variables and shares one
    function among groups that compute alike, so a function's bindings name one group only. Each call's own bindings
    are found by replaying its function on the call's arguments: a binding is the pre-fusion one that applies the
    same callee to the same values. A call where any binding has no single match gets no nodes.
    """
    import tvm
    from tvm import relax

    rows = [(str(name), str(node), str(sig)) for name, node, sig in binding_rows]
    order = {name: i for i, (name, _, _) in enumerate(rows)}
    node_of = {name: node for name, node, _ in rows}
    sig_of = {name: sig for name, _, sig in rows}
    by_sig: dict[str, list[str]] = {}
    for name, _, sig in rows:
        by_sig.setdefault(sig, []).append(name)
    renamed: dict = {}  # each variable of main -> the name of its pre-fusion binding (or UNKNOWN)
    tuples: dict = {}  # the same for fused calls that return several outputs (as a tuple)
    outer = lambda var: renamed.get(var, var.name)  # noqa: E731  (main's parameters keep their names)
    per_call: list[list[str]] = []
    for b in _bindings(mod["main"]):
        v = b.value
        if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar)
                and isinstance(mod[v.op], relax.Function)):
            if isinstance(v, relax.TupleGetItem) and v.tuple_value in tuples:
                renamed[b.var] = tuples[v.tuple_value][v.index]
                continue
            sig = _signature(v, outer) or ""
            if sig_of.get(b.var.name) == sig:  # a binding FuseOps kept as it was
                renamed[b.var] = b.var.name
            else:  # one FuseOps made anew (an output taken out of a fused tuple): found by what it computes
                match = by_sig.get(sig, [])
                renamed[b.var] = match[0] if len(match) == 1 else UNKNOWN
            if isinstance(v, relax.Call) and _is_call_tir(v):
                per_call.append([n for n in [node_of.get(renamed[b.var], "")] if n])
            continue
        func = mod[v.op]
        local = {p: (outer(a) if isinstance(a, relax.Var) else "<const>") for p, a in zip(func.params, v.args)}
        members: list[str] = []
        for inner in _bindings(func):
            match = by_sig.get(_signature(inner.value, lambda x: local.get(x, UNKNOWN)) or "", [])
            if len(match) != 1:
                members = []
                break
            local[inner.var] = match[0]
            members.append(match[0])
        result = func.body.body
        if isinstance(result, relax.Tuple):
            tuples[b.var] = [local.get(f, UNKNOWN) if members else UNKNOWN for f in result.fields]
        else:
            renamed[b.var] = local.get(result, UNKNOWN) if members else UNKNOWN
        per_call.append([n for n in _unique(node_of[m] for m in sorted(members, key=order.get)) if n])
    return per_call


def _named_kernels(mod, per_call) -> list | None:
    from tvm import relax

    symbols = [v.args[0].name_hint for b in _bindings(mod["main"])
               if isinstance(v := b.value, relax.Call) and _is_call_tir(v)]
    if len(symbols) != len(per_call):
        return None  # FuseTIR did something this map does not know: no map rather than a wrong one
    return [[s, list(nodes)] for s, nodes in zip(symbols, per_call)]


def called_kernels(mod) -> list[str]:
    """The PrimFuncs main calls, in order, in a module the whole Relax build pipeline has run on."""
    import tvm
    from tvm import relax

    return [v.op.name_hint for b in _bindings(mod["main"])
            if isinstance(v := b.value, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar)
            and isinstance(mod[v.op], tvm.tirx.PrimFunc)]


def align(planned: Sequence[tuple[str, Sequence[str]]], called: Sequence[str]) -> tuple[KernelNodes, ...]:
    """Match the kernels the VM calls with the planned ones, in order; () when they do not line up exactly.

    A planned kernel may be missing from `called` (a pass made it a builtin), but then every call of that symbol must
    be: a symbol both skipped and called would make the match ambiguous.
    """
    out: list[KernelNodes] = []
    skipped: set[str] = set()
    i = 0
    for symbol in called:
        while i < len(planned) and planned[i][0] != symbol:
            skipped.add(planned[i][0])
            i += 1
        if i == len(planned):
            return ()
        out.append(KernelNodes(symbol, tuple(planned[i][1])))
        i += 1
    skipped.update(s for s, _ in planned[i:])
    return () if skipped & set(called) else tuple(out)


def capturing_pipeline(sink: list):
    """TVM's default Relax build pipeline, then a pass that appends the kernel map of the result to `sink`."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="SlimcCaptureKernels")
    def capture(mod, _ctx):
        planned = mod.attrs[KERNELS] if mod.attrs is not None and KERNELS in mod.attrs else []
        sink.extend(align([(str(s), [str(n) for n in nodes]) for s, nodes in planned], called_kernels(mod)))
        return mod.without_attr(KERNELS) if planned else mod

    return tvm.transform.Sequential([relax.get_pipeline("default"), capture])
