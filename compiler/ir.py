"""slimc's typed graph IR: SSA nodes with tensor types, named weights, stable text form, verify, save/load."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from slimc.errors import IRError

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

Dim = Union[int, str]
AttrValue = Union[int, float, str, bool, None, tuple]

#: short dtype names used in the text form, and their numpy names
DTYPES: dict[str, str] = {
    "f32": "float32",
    "f16": "float16",
    "f64": "float64",
    "i64": "int64",
    "i32": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "u16": "uint16",
    "bool": "bool",
}
_LONG_TO_SHORT = {v: k for k, v in DTYPES.items()}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")


def sanitize_name(raw: str) -> str:
    """Map a frontend name to the IR's identifier alphabet ([A-Za-z0-9_.])."""
    out = re.sub(r"[^A-Za-z0-9_.]", "_", raw)
    return out or "v"


def unique_name(base: str, taken: Callable[[str], bool] | Container[str]) -> str:
    """`base`, else `base_1`, `base_2`, ...: the first name not taken (a set, or a predicate)."""
    is_taken = taken if callable(taken) else taken.__contains__
    name, i = base, 1
    while is_taken(name):
        name, i = f"{base}_{i}", i + 1
    return name


@dataclass(frozen=True)
class TensorType:
    """Shape and element type of a value; a str dim is symbolic (e.g. the batch 'N')."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _LONG_TO_SHORT:
            raise IRError(f"unknown dtype {self.dtype!r}; known: {', '.join(_LONG_TO_SHORT)}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
                raise IRError(f"bad dimension {d!r} in shape {self.shape}: dims are ints >= 0 or symbol names")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self, symbol_value: int = 1) -> int:
        """Element count, with symbolic dims taken as `symbol_value` (1: per-sample counts)."""
        return math.prod(d if isinstance(d, int) else symbol_value for d in self.shape)

    def nbytes(self) -> int:
        return self.numel() * np.dtype(self.dtype).itemsize

    def with_shape(self, shape: Sequence[Dim]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def __str__(self) -> str:
        return f"{_LONG_TO_SHORT[self.dtype]}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(tuple(int(d) for d in array.shape), str(array.dtype))


@dataclass(frozen=True)
class Node:
    """One operation in SSA form; its outputs are named after the node (`name`, or `name#i` when several)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, AttrValue]
    out_types: tuple[TensorType, ...]
    source: tuple[str, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        if len(self.out_types) == 1:
            return (self.name,)
        return tuple(f"{self.name}#{i}" for i in range(len(self.out_types)))

    @property
    def out_type(self) -> TensorType:
        if len(self.out_types) != 1:
            raise IRError(f"node {self.name} ({self.op}) has {len(self.out_types)} outputs, not one")
        return self.out_types[0]

    def replace(self, **changes: Any) -> Node:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Graph:
    """A whole model: typed inputs, parameters (weights), topologically ordered nodes, outputs.

    Equality is structural (weights are compared by type, not by value) so that `parse(print(g)) == g`.
    `calibration` holds the calibrated (lo, hi) range of activation values (filled by the calibrate pass, read by
    quantize); it is printed as `calib %v [lo, hi]` lines. `channel_calibration` adds, for some of those values,
    one (lo, hi) per channel (axis 1), for per-channel grids; printed on the same line as `channels [[lo, hi], ...]`.
    Rebuilding a graph keeps only ranges that cannot be stale: `replace`/`with_nodes` drop those of values that no
    longer exist or are computed from new weight data, `rewrite.Edit.apply` those of everything downstream of what
    it changed; a value's channel ranges go with its range (`replace(calibration=...)` keeps them only where the
    value's range is unchanged).
    """

    name: str
    inputs: tuple[tuple[str, TensorType], ...]
    outputs: tuple[str, ...]
    nodes: tuple[Node, ...]
    param_types: Mapping[str, TensorType]
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    calibration: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    channel_calibration: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple((n, t) for n, t in self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "param_types", dict(self.param_types))
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "calibration", _normalize_calibration(self.name, self.calibration))
        object.__setattr__(self, "channel_calibration",
                           _normalize_channel_calibration(self.name, self.channel_calibration))

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def from_weights(
        name: str,
        inputs: Sequence[tuple[str, TensorType]],
        outputs: Sequence[str],
        nodes: Sequence[Node],
        weights: Mapping[str, np.ndarray],
    ) -> Graph:
        """Build a graph whose parameter types are read off the weight arrays."""
        return Graph(name, tuple(inputs), tuple(outputs), tuple(nodes),
                     {k: TensorType.of(v) for k, v in weights.items()}, dict(weights))

    def replace(self, **changes: Any) -> Graph:
        """A copy with `changes`. Unless `calibration` is given, ranges of values that no longer exist drop out, and
        so do those computed from a weight whose data is replaced (a new array object), as they may be stale."""
        if "calibration" in changes and "channel_calibration" not in changes:  # channel ranges follow their value's
            changes["channel_calibration"] = {v: r for v, r in self.channel_calibration.items()
                                              if self.calibration.get(v) == _pair(changes["calibration"].get(v))}
        g = dataclasses.replace(self, **changes)
        return g if "calibration" in changes else self._fresh_calibration_of(g)

    def _fresh_calibration_of(self, g: Graph) -> Graph:
        """`g`, a rebuild of this graph, keeping only ranges of values that exist and use no replaced weight data."""
        new_data = {k for k, v in g.weights.items() if k in self.weights and v is not self.weights[k]}
        if new_data and g.calibration:
            g = g._calibration_of(g.calibration_without(new_data))
        return g.drop_stale_calibration()

    def _calibration_of(self, keep: Iterable[str]) -> Graph:
        """This graph with the (whole-tensor and per-channel) ranges of the `keep` values only."""
        keep = set(keep)
        return dataclasses.replace(self, calibration={v: r for v, r in self.calibration.items() if v in keep},
                                   channel_calibration={v: r for v, r in self.channel_calibration.items() if v in keep})

    def calibration_without(self, changed: Iterable[str]) -> dict[str, tuple[float, float]]:
        """The calibrated ranges minus those of `changed` values and of every value computed from one of them."""
        dirty = set(changed)
        for n in self.nodes:
            if any(i in dirty for i in n.inputs):
                dirty.update(n.outputs)
        return {v: r for v, r in self.calibration.items() if v not in dirty}

    def drop_stale_calibration(self) -> Graph:
        """Keep the calibrated ranges of values this graph still has (a rebuilt graph may have lost some)."""
        if all(v in self.value_types for v in self.calibration):
            return self
        return self._calibration_of(v for v in self.calibration if v in self.value_types)

    def with_nodes(self, nodes: Sequence[Node], weights: Mapping[str, np.ndarray] | None = None,
                   outputs: Sequence[str] | None = None) -> Graph:
        """A new graph with other nodes (and optionally weights/outputs); unused parameters are dropped, calibrated
        ranges kept where their values exist and use no replaced weight data (as in `replace`)."""
        w = dict(self.weights if weights is None else weights)
        ptypes = {k: TensorType.of(v) for k, v in w.items()} if weights is not None else dict(self.param_types)
        g = Graph(self.name, self.inputs, tuple(self.outputs if outputs is None else outputs), tuple(nodes), ptypes, w,
                  self.calibration, self.channel_calibration)
        return self._fresh_calibration_of(g).drop_unused_params()

    def drop_unused_params(self) -> Graph:
        used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
        if all(p in used for p in self.param_types):
            return self
        return dataclasses.replace(
            self,
            param_types={k: t for k, t in self.param_types.items() if k in used},
            weights={k: v for k, v in self.weights.items() if k in used},
        )

    # ---- queries ------------------------------------------------------------------------------
    @cached_property
    def value_types(self) -> dict[str, TensorType]:
        types: dict[str, TensorType] = dict(self.inputs)
        types.update(self.param_types)
        for n in self.nodes:
            types.update(zip(n.outputs, n.out_types))
        return types

    @cached_property
    def _producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    @cached_property
    def _users(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs):
                users.setdefault(i, []).append(n)
        return users

    @cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    def type_of(self, value: str) -> TensorType:
        try:
            return self.value_types[value]
        except KeyError:
            raise IRError(f"graph {self.name} has no value %{value}") from None

    def producer(self, value: str) -> Node | None:
        """The node computing `value`, or None for graph inputs and parameters."""
        return self._producers.get(value)

    def users(self, value: str) -> list[Node]:
        return list(self._users.get(value, ()))

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise IRError(f"graph {self.name} has no node {name}") from None

    def is_param(self, value: str) -> bool:
        return value in self.param_types

    def weight(self, value: str) -> np.ndarray:
        try:
            return self.weights[value]
        except KeyError:
            raise IRError(f"parameter %{value} of graph {self.name} has no weight data loaded") from None

    def fresh_name(self, base: str, taken: Iterable[str] = ()) -> str:
        """A value/node name not yet used in this graph (nor in `taken`)."""
        return unique_name(sanitize_name(base), set(self.value_types) | set(self._by_name) | set(taken))

    def to_networkx(self) -> nx.MultiDiGraph:
        """Dataflow view for analyses: one vertex per node/input/param, one edge per use (key = input slot)."""
        import networkx as nx

        g = nx.MultiDiGraph(name=self.name)
        for name, t in self.inputs:
            g.add_node(name, kind="input", type=t)
        for name, t in self.param_types.items():
            g.add_node(name, kind="param", type=t)
        for n in self.nodes:
            g.add_node(n.name, kind="op", op=n.op, attrs=dict(n.attrs), out_types=n.out_types, source=n.source)
            for slot, v in enumerate(n.inputs):
                prod = self.producer(v)
                g.add_edge(prod.name if prod else v, n.name, key=slot, value=v, type=self.type_of(v))
        return g

    def verify(self) -> None:
        """Check SSA, types and per-op invariants; raise IRError naming the first offending node."""
        from slimc import ops

        defined: dict[str, TensorType] = {}
        for name, t in list(self.inputs) + list(self.param_types.items()):
            if not _NAME_RE.match(name):
                raise IRError(f"graph {self.name}: value name {name!r} has characters outside [A-Za-z0-9_.]")
            if name in defined:
                raise IRError(f"graph {self.name}: value %{name} is defined twice")
            defined[name] = t
        for name, arr in self.weights.items():
            pt = self.param_types.get(name)
            if pt is None:
                raise IRError(f"graph {self.name}: weight {name} has no parameter declaration")
            if TensorType.of(arr) != pt:
                raise IRError(f"graph {self.name}: weight {name} is {TensorType.of(arr)} but declared {pt}")
        node_names: set[str] = set()
        for n in self.nodes:
            where = f"graph {self.name}, node {n.name} ({n.op})"
            if not _NAME_RE.match(n.name):
                raise IRError(f"{where}: node name has characters outside [A-Za-z0-9_.]")
            if n.name in node_names:
                raise IRError(f"{where}: node name is used twice")
            node_names.add(n.name)
            for i in n.inputs:
                if i not in defined:
                    raise IRError(f"{where}: input %{i} is not defined before use (SSA/topological order)")
            in_types = [defined[i] for i in n.inputs]
            try:
                expected = ops.infer(n.op, in_types, n.attrs)
            except IRError as e:
                raise IRError(f"{where}: {e}") from None
            if tuple(expected) != tuple(n.out_types):
                raise IRError(f"{where}: declared types {', '.join(map(str, n.out_types))} but the op gives "
                              f"{', '.join(map(str, expected))}")
            for o, t in zip(n.outputs, n.out_types):
                if o in defined:
                    raise IRError(f"{where}: value %{o} is defined twice")
                defined[o] = t
        if not self.outputs:
            raise IRError(f"graph {self.name} has no outputs")
        for o in self.outputs:
            if o not in defined:
                raise IRError(f"graph {self.name}: output %{o} is not defined")
        for v, (lo, hi) in self.calibration.items():
            if v not in defined or v in self.param_types:
                what = "a parameter" if v in self.param_types else "not a value of the graph"
                raise IRError(f"graph {self.name}: calibrated range for %{v}, which is {what}; calibration holds "
                              "activation ranges only (a rewrite that removes a value must drop its entry)")
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise IRError(f"graph {self.name}: calibrated range of %{v} is [{lo!r}, {hi!r}]; a range needs "
                              "finite bounds with lo <= hi")
        for v, ranges in self.channel_calibration.items():
            if v not in self.calibration:
                raise IRError(f"graph {self.name}: per-channel ranges for %{v}, which has no calibrated range; a value "
                              "with channel ranges also has its whole-tensor range")
            t = defined[v]
            if t.rank < 2 or (isinstance(t.shape[1], int) and t.shape[1] != len(ranges)):
                raise IRError(f"graph {self.name}: {len(ranges)} per-channel ranges for %{v}: {t}, whose axis 1 "
                              "holds the channels")
            if not all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in ranges):
                raise IRError(f"graph {self.name}: a per-channel range of %{v} is not finite with lo <= hi")

    def __str__(self) -> str:
        return print_graph(self)


def _normalize_calibration(graph: str, cal: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Calibration as {value: (lo, hi)} with Python floats, so that equality and printing are exact."""
    out: dict[str, tuple[float, float]] = {}
    for v, r in cal.items():
        try:
            lo, hi = r
            out[str(v)] = (float(lo), float(hi))
        except (TypeError, ValueError):
            raise IRError(f"graph {graph}: calibrated range of %{v} is {r!r}; expected a pair (lo, hi) of numbers") \
                from None
    return out


def _pair(r: Any) -> tuple[float, float] | None:
    """A range as a pair of Python floats (None stays None), to compare ranges however they were given."""
    return None if r is None else (float(r[0]), float(r[1]))


def _normalize_channel_calibration(graph: str, cal: Mapping[str, Any]) -> dict[str, tuple[tuple[float, float], ...]]:
    """Per-channel calibration as {value: ((lo, hi), ...)} with Python floats."""
    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for v, ranges in cal.items():
        try:
            out[str(v)] = tuple((float(lo), float(hi)) for lo, hi in ranges)
        except (TypeError, ValueError):
            raise IRError(f"graph {graph}: per-channel ranges of %{v} are not a sequence of (lo, hi) pairs") from None
    return out


# ---- text form -----------------------------------------------------------------------------------

def format_attr(v: AttrValue) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".einf") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ",".join(format_attr(x) for x in v) + "]"
    raise IRError(f"attribute value {v!r} has unsupported type {type(v).__name__}")


def _format_node(n: Node) -> str:
    from slimc import ops

    outs = ", ".join(f"%{o}: {t}" for o, t in zip(n.outputs, n.out_types))
    shown = ops.non_default_attrs(n.op, n.attrs)
    attrs = " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(shown.items())) + "}" if shown else ""
    loc = f" loc({', '.join(json.dumps(s) for s in n.source)})" if n.source else ""
    return f"  {outs} = {n.op}({', '.join('%' + i for i in n.inputs)}){attrs}{loc}"


def print_graph(g: Graph) -> str:
    """Stable, diffable text: one parameter or node per line."""
    lines = [f"graph @{g.name}({', '.join(f'%{n}: {t}' for n, t in g.inputs)}) {{"]
    lines += [f"  param %{n}: {t}" for n, t in g.param_types.items()]
    lines += [_format_node(n) for n in g.nodes]
    order = {v: i for i, v in enumerate(g.value_types)}
    for v in sorted(g.calibration, key=lambda v: (order.get(v, len(order)), v)):
        lo, hi = g.calibration[v]
        per_channel = g.channel_calibration.get(v)
        channels = "" if per_channel is None else \
            " channels [" + ", ".join(f"[{a!r}, {b!r}]" for a, b in per_channel) + "]"
        lines.append(f"  calib %{v} [{lo!r}, {hi!r}]{channels}")
    lines.append(f"  return {', '.join('%' + o for o in g.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<float>-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|inf|nan))
      | (?P<int>-?\d+)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[\[\],])
    )""",
    re.VERBOSE,
)


def parse_attr(text: str) -> AttrValue:
    """Parse one attribute value in the printer's syntax."""
    pos = 0
    tokens: list[tuple[str, str]] = []
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise IRError(f"cannot parse attribute value {text!r} at {text[pos:]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()

    def value(i: int) -> tuple[AttrValue, int]:
        kind, tok = tokens[i]
        if kind == "punct" and tok == "[":
            items: list[AttrValue] = []
            i += 1
            if tokens[i] == ("punct", "]"):
                return (), i + 1
            while True:
                v, i = value(i)
                items.append(v)
                if tokens[i] == ("punct", "]"):
                    return tuple(items), i + 1
                if tokens[i] != ("punct", ","):
                    raise IRError(f"expected ',' or ']' in attribute value {text!r}")
                i += 1
        if kind == "str":
            return json.loads(tok), i + 1
        if kind == "float":
            return float(tok), i + 1
        if kind == "int":
            return int(tok), i + 1
        if kind == "word" and tok in ("true", "false"):
            return tok == "true", i + 1
        if kind == "word" and tok == "none":
            return None, i + 1
        raise IRError(f"unexpected token {tok!r} in attribute value {text!r}")

    try:
        v, end = value(0)
    except IndexError:
        raise IRError(f"attribute value {text!r} ends early") from None
    if end != len(tokens):
        raise IRError(f"trailing text in attribute value {text!r}")
    return v


def parse_type(text: str) -> TensorType:
    m = re.fullmatch(r"\s*([a-z0-9]+)\[([^\]]*)\]\s*", text)
    if not m or m.group(1) not in DTYPES:
        raise IRError(f"cannot parse tensor type {text!r}; expected e.g. f32[N,3,224,224]")
    dims: list[Dim] = []
    for d in filter(None, (x.strip() for x in m.group(2).split(","))):
        dims.append(int(d) if re.fullmatch(r"\d+", d) else d)
    return TensorType(tuple(dims), DTYPES[m.group(1)])


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces and strings."""
    parts, depth, cur, in_str, esc = [], 0, [], False, False
    for ch in text:
        if in_str:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


_HEADER_RE = re.compile(r"^graph @([A-Za-z0-9_.]+)\((.*)\) \{$")
_NODE_RE = re.compile(r"^(?P<outs>.+?) = (?P<op>[a-z_0-9]+)\((?P<ins>[^)]*)\)(?: \{(?P<attrs>.*?)\})?(?: loc\((?P<loc>.*)\))?$")
_TYPED_VALUE_RE = re.compile(r"^%([A-Za-z0-9_.#]+): (.+)$")
_CALIB_RE = re.compile(r"^calib %([A-Za-z0-9_.#]+) \[([^,\]]+), ([^,\]]+)\](?: channels (\[.*\]))?$")


def parse_graph(text: str) -> Graph:
    """Parse the printer's text back into a Graph (without weight data)."""
    from slimc import ops

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("//")]
    if not lines:
        raise IRError("empty graph text")
    m = _HEADER_RE.match(lines[0])
    if not m:
        raise IRError(f"line 1: expected 'graph @name(%x: f32[...]) {{', got {lines[0]!r}")
    name = m.group(1)

    def typed(s: str, lineno: int) -> tuple[str, TensorType]:
        tm = _TYPED_VALUE_RE.match(s.strip())
        if not tm:
            raise IRError(f"line {lineno}: expected '%name: type', got {s!r}")
        return tm.group(1), parse_type(tm.group(2))

    inputs = tuple(typed(s, 1) for s in _split_top(m.group(2)))
    params: dict[str, TensorType] = {}
    nodes: list[Node] = []
    outputs: tuple[str, ...] | None = None
    calibration: dict[str, tuple[float, float]] = {}
    channel_calibration: dict[str, tuple[tuple[float, float], ...]] = {}
    for lineno, ln in enumerate(lines[1:], start=2):
        if ln == "}":
            break
        if ln.startswith("calib "):
            cm = _CALIB_RE.match(ln)
            try:
                if not cm:
                    raise ValueError(ln)
                calibration[cm.group(1)] = (float(cm.group(2)), float(cm.group(3)))
                if cm.group(4):
                    pairs = json.loads(cm.group(4))
                    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                        raise ValueError(ln)
                    channel_calibration[cm.group(1)] = tuple((float(lo), float(hi)) for lo, hi in pairs)
            except (ValueError, TypeError):
                raise IRError(f"line {lineno}: expected 'calib %value [lo, hi]' with two numbers, optionally "
                              f"followed by 'channels [[lo, hi], ...]', got {ln!r}") from None
        elif ln.startswith("param "):
            pname, ptype = typed(ln[len("param "):], lineno)
            params[pname] = ptype
        elif ln.startswith("return "):
            outputs = tuple(o.strip().lstrip("%") for o in ln[len("return "):].split(","))
        else:
            nm = _NODE_RE.match(ln)
            if not nm:
                raise IRError(f"line {lineno}: cannot parse node {ln!r}")
            outs = [typed(s, lineno) for s in _split_top(nm.group("outs"))]
            node_name = outs[0][0].split("#")[0] if len(outs) > 1 else outs[0][0]
            ins = tuple(s.strip().lstrip("%") for s in nm.group("ins").split(",") if s.strip())
            attrs: dict[str, AttrValue] = {}
            for kv in _split_top(nm.group("attrs") or ""):
                k, _, v = kv.partition("=")
                attrs[k.strip()] = parse_attr(v)
            loc = tuple(json.loads(f"[{nm.group('loc')}]")) if nm.group("loc") else ()
            try:
                full = ops.normalize_attrs(nm.group("op"), attrs)
            except IRError as e:
                raise IRError(f"line {lineno}: {e}") from None
            node = Node(node_name, nm.group("op"), ins, full, tuple(t for _, t in outs), loc)
            if tuple(o for o, _ in outs) != node.outputs:
                raise IRError(f"line {lineno}: outputs of a multi-output node are named NAME#0, NAME#1, ...")
            nodes.append(node)
    if outputs is None:
        raise IRError("graph text has no 'return' line")
    return Graph(name, inputs, outputs, tuple(nodes), params, calibration=calibration,
                 channel_calibration=channel_calibration)


# ---- save / load -------------------------------------------------------------------------------

FORMAT_VERSION = "1"


def save(graph: Graph, path: str | os.PathLike[str]) -> None:
    """Write the graph and its weights to one safetensors file (IR text, with calibration, in the metadata); atomic."""
    from safetensors.numpy import save_file

    missing = [p for p in graph.param_types if p not in graph.weights]
    if missing:
        raise IRError(f"cannot save graph {graph.name}: parameters without weight data: {', '.join(missing[:5])}")
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in graph.weights.items()}  # keeps 0-d
    save_file(tensors, tmp, metadata={"slimc_format": FORMAT_VERSION, "slimc_ir": print_graph(graph)})
    os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> Graph:
    """Read a graph saved by `save`."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("slimc_format") != FORMAT_VERSION or "slimc_ir" not in meta:
                raise IRError(f"{path} is a safetensors file but not a slimc graph (format {FORMAT_VERSION})")
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except IRError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise IRError(f"cannot read slimc graph file {path}: {e}. Save graphs with slimc.ir.save.") from None
    g = parse_graph(meta["slimc_ir"])
    return g.replace(weights=weights)
