"""`slimc compile` end to end: optimized graph -> tuned TVM build -> checked, measured artifact."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimc import __version__
from slimc.pass_manager import StepRecord, compare
from slimc.report import table
from slimc.stats import human

GRAPH_NAME = "model.slimc"
CHECK_NAME = "check.npz"


@dataclass(frozen=True)
class CompileResult:
    out_dir: str
    meta: dict

    def summary(self) -> str:
        m = self.meta
        t = m["tuning"]
        lines = [f"artifact: {self.out_dir}",
                 f"target: {m['target']['describe']}",
                 f"tuning: {t['tasks_tuned']} workloads tuned ({t['trials']} trials, {t['seconds']:.0f} s), "
                 f"{t['tasks_reused']} of {t['tasks_total']} reused from {t['database']}"]
        q = m.get("quantization")
        if q:
            dots = q.get("int8_dot_instructions") or {}
            wide = f" (+{q['int16_mac_share']:.1%} reading int16 activations)" if q.get("int16_mac_share") else ""
            lines.append(f"int8: {q['int8_mac_share']:.1%} of MACs in int8 kernels{wide}, {q['quantize_ops']} "
                         f"quantize / {q['dequantize_ops']} dequantize ops left"
                         + (", " + ", ".join(f"{k} x{v}" for k, v in dots.items() if v) if dots else ""))
        ev = m.get("evaluation")
        if ev:
            lines.append(f"top-1 agreement with {m['reference']}: {ev['top1_agreement']:.1%} on {ev['samples']} "
                         f"samples (median logit SQNR {ev['sqnr_db_median']:.1f} dB)")
        if m["check"]:
            lines.append(f"artifact vs IR interpreter: max error {m['check']['max_rel']:.1e} of output range, "
                         f"SQNR {m['check']['sqnr_db']:.1f} dB")
        if m["latency"]:
            lat = m["latency"]
            lines.append(f"latency: {lat['median_ms']:.3f} ms median (p10 {lat['p10_ms']:.3f}, p90 {lat['p90_ms']:.3f}, "
                         f"{lat['threads']} threads)")
            lines += [f"  {line}" for line in _baseline_lines(m)]
        elif m["check"]:  # it ran here, so only --no-measure left it untimed
            lines.append(f"latency: not measured (--no-measure); `slimc measure {self.out_dir}` times it")
        else:
            lines.append("latency: not measured here (target is not this machine; use `slimc measure --rpc`)")
        return "\n".join(lines)


def _baseline_lines(meta: dict) -> list[str]:
    """'PyTorch eager: 20.1 ms median (slimc 1.35x faster)' for each measured baseline."""
    lat = meta["latency"]["median_ms"]
    out = []
    for b in meta.get("baselines") or []:
        r = b["median_ms"] / lat
        verdict = f"slimc {r:.2f}x faster" if r >= 1 else f"slimc {1 / r:.2f}x slower"
        out.append(f"{b['name']}: {b['median_ms']:.3f} ms median ({verdict})")
    return out


def _versions() -> dict:
    import torch
    import tvm

    return {"slimc": __version__, "tvm": tvm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def _report_md(meta: dict) -> str:
    rows = []
    for r in meta["passes"]:
        f = r["fidelity"]
        rows.append([str(r["index"]), r["pass"], str(r["stats"]["nodes"]), human(r["stats"]["params"]),
                     human(r["stats"]["macs"]), human(r["stats"]["bytes"], "B"),
                     f"{f['max_rel']:.1e}" if f else "-"])
    t, lat, chk = meta["tuning"], meta["latency"], meta["check"]
    out = [f"# slimc artifact: {meta['model']}", "",
           f"- target: `{meta['target']['describe']}` (int8 dot product: {meta['target']['int8_dot'] or 'none'})",
           f"- pipeline: `{meta['pipeline'] or '(none)'}`",
           f"- versions: slimc {meta['versions']['slimc']}, TVM {meta['versions']['tvm']}, torch {meta['versions']['torch']}",
           f"- tuning: {t['tasks_tuned']} workloads tuned with {t['trials']} trials in {t['seconds']:.0f} s; "
           f"{t['tasks_reused']}/{t['tasks_total']} reused from `{t['database']}`",
           f"- build: {meta['build_seconds']:.1f} s",
           f"- artifact vs IR interpreter: " + (f"max error {chk['max_rel']:.1e} of range, SQNR {chk['sqnr_db']:.1f} dB"
                                               if chk else "not run on this machine (cross build)"),
           f"- latency: " + (f"{lat['median_ms']:.3f} ms median, p10 {lat['p10_ms']:.3f}, p90 {lat['p90_ms']:.3f} "
                            f"({lat['repeats']}x{lat['number']} runs, {lat['threads']} threads, {lat['where']})"
                            if lat else "not measured"),
           *[f"- baseline {line}" for line in (_baseline_lines(meta) if lat else [])],
           *([f"- top-1 agreement with {meta['reference']}: {ev['top1_agreement']:.1%} on {ev['samples']} samples, "
              f"median logit SQNR {ev['sqnr_db_median']:.1f} dB"] if (ev := meta.get("evaluation")) else []),
           "", "## Passes (error vs the original model)", "", "```",
           table(["step", "pass", "nodes", "params", "MACs", "bytes", "max err/range"], rows), "```", "",
           *_quant_lines(meta.get("quantization"))]
    return "\n".join(out)


def quantization_summary(graph, records: Sequence[StepRecord]) -> dict | None:
    """int8 (and int16-activation) share of MACs, quantize/dequantize ops left, float layers, per-layer SQNR: the
    report's proof of real int8 compute."""
    from slimc.passes.quant.fold import INTEGER_OPS, int8_mac_share

    steps = {r.name.split("{")[0]: r.pass_stats for r in records}
    if "quantize" not in steps and not any(n.op in ("quantize", "dequantize", *INTEGER_OPS) for n in graph.nodes):
        return None
    quantize = steps.get("quantize", {})  # absent: the model was quantized before (a saved .slimc)
    counts = {op: sum(1 for n in graph.nodes if n.op == op) for op in ("quantize", "dequantize")}
    return {"int8_mac_share": round(int8_mac_share(graph), 4), "int16_mac_share": round(int8_mac_share(graph, True), 4),
            "quantize_ops": counts["quantize"],
            "dequantize_ops": counts["dequantize"], "scheme": quantize.get("scheme"),
            "float_layers": [n.name for n in graph.nodes if n.op in ("conv2d", "dense")],
            "int16_layers": [n.name for n in graph.nodes if n.op in ("qconv2d", "qdense")
                             and graph.type_of(n.inputs[0]).dtype == "uint16"],
            "layer_sqnr_db": quantize.get("layer_sqnr_db", {}), "int8_dot_instructions": None}


def _dot_counts(lib: str, tgt, log) -> dict | None:
    from slimc.errors import SlimcError
    from slimc.targets.asm import count_int8_dot

    try:
        return count_int8_dot(lib, tgt)
    except SlimcError as e:
        log(f"warning: {e}")
        return None


def _quant_lines(q: dict | None) -> list[str]:
    if not q:
        return []
    dots = q.get("int8_dot_instructions")
    lines = ["", "## int8", "",
             f"- MACs in int8 kernels: {q['int8_mac_share']:.1%}; scheme "
             f"{q['scheme'] or 'not known (quantized before this pipeline)'}",
             f"- MACs in integer kernels reading int16 activations: {q.get('int16_mac_share', 0.0):.1%} "
             f"({', '.join(q.get('int16_layers', [])) or 'none'})",
             f"- quantize / dequantize ops left: {q['quantize_ops']} / {q['dequantize_ops']}",
             f"- float layers: {', '.join(q['float_layers']) or 'none'}",
             "- int8 dot-product instructions in the library: "
             + (", ".join(f"{k} {v}" for k, v in dots.items()) if dots else "not counted"), "",
             "Per-layer SQNR, int8 vs float (errors accumulated from the input):", "", "```"]
    rows = [[v, "exact" if db is None else f"{db:.1f}"] for v, db in q["layer_sqnr_db"].items()]
    return lines + [table(["value", "SQNR dB"], rows) if rows else "(no sample inputs)", "```", ""]


def evaluate(model, oracle, dataset, limit: int = 256) -> dict:
    """Top-1 agreement and logit SQNR of the artifact against the original model, one sample at a time."""
    agree, sqnrs, n = 0, [], 0
    for batch in dataset.batches(1):
        got, ref = model.run(*batch.inputs)[0], oracle(list(batch.inputs))[0]
        agree += int(np.argmax(got.reshape(-1)) == np.argmax(ref.reshape(-1)))
        sqnrs.append(compare([got], [ref]).sqnr_db)
        n += 1
        if n >= limit:
            break
    return {"samples": n, "top1_agreement": agree / n if n else None,
            "sqnr_db_median": float(np.median(sqnrs)) if sqnrs else None}


def compile_graph(loaded, pipeline: str, graph, records: Sequence[StepRecord], *, target, mcpu: str | None,
                  mattr: str | None, trials: int, tune_db: str | None, tune_ops: list[str] | None, measure: bool,
                  out_dir: str, sample: Sequence[np.ndarray], compare_baselines: bool = False,
                  calibration=None, eval_data=None, log=None) -> CompileResult:
    """Build the optimized graph for the target, check it against the IR, measure it, write the artifact."""
    from slimc import interpreter, ir, runtime
    from slimc.targets.build import build, host_arch, write_artifact
    from slimc.targets.measure import measure_local
    from slimc.targets.triple import resolve

    log = log or (lambda msg: print(msg, file=sys.stderr))
    tgt = resolve(target, mcpu, mattr) if isinstance(target, str) else target
    if trials > 0 and not (tgt.arch == host_arch() and _runs_here(tgt)):
        from slimc.targets.tune import TuningError

        raise TuningError(f"tuning for {tgt.describe()} needs that CPU to time candidates, and this machine is not "
                          "one; compile with --trials 0 (untuned schedules) here, or tune on a matching machine and "
                          "pass its database with --tune-db")
    result = build(graph, tgt, trials=trials, db_path=tune_db, tune_ops=tune_ops, log=log)
    ref_out = interpreter.run(graph, list(sample))
    meta = {
        "versions": _versions(), "model": loaded.spec, "reference": loaded.oracle_name,
        "target": {"triple": tgt.triple, "mcpu": tgt.mcpu, "mattr": list(tgt.mattr), "isa": tgt.isa_summary(),
                   "int8_dot": tgt.int8_dot, "tvm": tgt.tvm_dict(), "describe": tgt.describe()},
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": t.dtype} for n, t in graph.inputs],
        "outputs": [{"name": o, "shape": list(graph.type_of(o).shape), "dtype": graph.type_of(o).dtype}
                    for o in graph.outputs],
        "pipeline": pipeline, "passes": [r.to_json() for r in records], "tuning": result.tuning.to_json(),
        "build_seconds": result.build_seconds, "check": None, "latency": None,
        "quantization": quantization_summary(graph, records),
        "kernels": [k.to_json() for k in result.kernels],
    }

    def extra(tmp: str) -> None:
        ir.save(graph, os.path.join(tmp, GRAPH_NAME))
        np.savez(os.path.join(tmp, CHECK_NAME), **{f"input{i}": x for i, x in enumerate(sample)},
                 **{f"output{i}": y for i, y in enumerate(ref_out)})

    on_host = tgt.arch == host_arch()
    out_dir = write_artifact(out_dir, result.executable, tgt, meta, _report_md(meta), extra)
    if meta["quantization"]:
        meta["quantization"]["int8_dot_instructions"] = _dot_counts(os.path.join(out_dir, runtime.LIB_NAME), tgt, log)
        _rewrite_meta(out_dir, meta)
    if on_host:
        model = runtime.load(out_dir)
        meta["check"] = compare(model.run(*sample), ref_out).to_json()
        if eval_data is not None:
            meta["evaluation"] = evaluate(model, loaded.oracle, eval_data)
        if measure and (tgt.is_host or _runs_here(tgt)):
            meta["latency"] = measure_local(model, sample).to_json()
            if compare_baselines:
                meta["baselines"] = baselines(loaded, sample, calibration=calibration)
        _rewrite_meta(out_dir, meta)
    return CompileResult(out_dir, meta)


def baselines(loaded, sample: Sequence[np.ndarray], repeat: int = 30, number: int = 5, warmup: int = 10, *,
              calibration=None, calib_method: str = "minmax") -> list[dict]:
    """Latency of the original model in its own framework and in ONNX Runtime fp32, same inputs, same machine.

    With `calibration` (input arrays or a slimc.data.Dataset) also ONNX Runtime's static int8 QDQ model.
    """
    import tempfile
    import time

    from slimc import export
    from slimc.ort_quant import ort_session, quantize_with_ort
    from slimc.targets.measure import time_callable

    def timed(name: str, fn) -> dict:
        return {"name": name, **time_callable(fn, number=number, repeat=repeat, warmup=warmup).to_json()}

    out = [timed(loaded.oracle_name, lambda: loaded.oracle(sample))]
    from_onnx = loaded.oracle_name == "ONNX Runtime"
    if from_onnx and calibration is None:
        return out
    with tempfile.TemporaryDirectory() as d:
        path = loaded.spec if from_onnx else os.path.join(d, "model.onnx")
        if not from_onnx:
            export.to_onnx(loaded.graph, path)
            sess = ort_session(path)
            feed = {i.name: x for i, x in zip(sess.get_inputs(), sample)}
            out.append(timed("ONNX Runtime fp32", lambda: sess.run(None, feed)))
        if calibration is not None:
            t0 = time.perf_counter()
            qpath = quantize_with_ort(path, os.path.join(d, "model.int8.onnx"), calibration, calib_method)
            seconds = time.perf_counter() - t0
            qsess = ort_session(qpath)
            qfeed = {i.name: x for i, x in zip(qsess.get_inputs(), sample)}
            out.append({**timed("ONNX Runtime int8", lambda: qsess.run(None, qfeed)),
                        "calibration": calib_method, "quantize_seconds": seconds})
    return out


def _runs_here(tgt) -> bool:
    """A non-native x86 target still runs here if this CPU has every feature it uses."""
    from slimc.targets.triple import resolve

    return tgt.features <= resolve("native").features


def _rewrite_meta(out_dir: str, meta: dict) -> None:
    """Add the post-build check and latency to meta.json and report.md (atomic per file)."""
    import json

    for name, text in (("meta.json", json.dumps(meta, indent=2)), ("report.md", _report_md(meta))):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def _check_inputs(path: str) -> list[np.ndarray]:
    """The sample inputs an artifact was checked with (its check.npz), to time it on real data."""
    from slimc import runtime

    meta = runtime.read_meta(path)
    sample = np.load(os.path.join(path, CHECK_NAME))
    return [sample[f"input{i}"] for i in range(len(meta["inputs"]))]


def measure_artifact(path: str, *, rpc: str | None, key: str | None, repeat: int, number: int, warmup: int):
    """Latency of an artifact on this machine or, with `rpc`, on a board reserved from the tracker."""
    from slimc import runtime
    from slimc.targets.measure import MeasureError, measure_local, measure_rpc

    inputs = _check_inputs(path)
    if rpc:
        if not key:
            raise MeasureError("--rpc needs --key (the device key the board registered with the tracker)")
        return measure_rpc(path, inputs, rpc, key, number=number, repeat=repeat, warmup=warmup)
    return measure_local(runtime.load(path), inputs, number=number, repeat=repeat, warmup=warmup)


def profile_artifact(path: str, *, rpc: str | None, repeat: int, number: int, warmup: int):
    """Per-kernel profile of an artifact on this machine (slimc.targets.profile)."""
    from slimc import runtime
    from slimc.targets.measure import MeasureError
    from slimc.targets.profile import profile_local

    if rpc:
        raise MeasureError("--profile runs here only: TVM's RPC session cannot instrument the remote VM's calls; "
                           "profile it on a machine of its architecture that has slimc and TVM, or drop --profile "
                           "to time it end to end through the tracker")
    inputs = _check_inputs(path)
    return profile_local(runtime.load(path), inputs, number=number, repeat=repeat, warmup=warmup)
