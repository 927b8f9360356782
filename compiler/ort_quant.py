"""ONNX Runtime's own static int8 quantization (QDQ), the reference that slimc's int8 is measured against.

Same scheme as slimc's CPU int8: u8 asymmetric activations, s8 symmetric per-output-channel weights, QDQ
format, calibrated on the same data slimc calibrates on (an iterable of input arrays or a `slimc.data.Dataset`).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import numpy as np

from slimc.data import Dataset
from slimc.errors import SlimcError

METHODS = ("minmax", "entropy", "percentile")
CALIB_BATCH = 16  # samples per calibration run when the model's batch dimension is free
MAX_IN_MEMORY = 32  # samples whose activations ORT's calibrator holds at once (it keeps a round's outputs)
# quantize_static cannot pass histogram sizes to its calibrators, and ORT's entropy default (128 bins searched for
# 128 quantized bins) has a single candidate threshold, the full range: "entropy" would silently be min-max. We run
# ORT's calibrator ourselves with a histogram fine enough for the KL search (2048 bins over [-t, t]; 256 quantized
# bins = the 8-bit grid over that window), then hand the ranges to quantize_static. Percentile keeps ORT's defaults.
CALIBRATOR_OPTIONS: dict[str, dict] = {"minmax": {}, "entropy": {"num_bins": 2048, "num_quantized_bins": 256},
                                       "percentile": {}}

Calibration = Union[Dataset, Iterable[Union[np.ndarray, Sequence[np.ndarray]]]]  # one array per graph input


class OrtQuantError(SlimcError):
    """ONNX Runtime could not quantize the model, or the calibration data does not fit it."""


def ort_session(path: str | os.PathLike[str], threads: int | None = None):
    """A CPU InferenceSession with `threads` intra-op threads (default: every CPU this process may use)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    try:
        return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise OrtQuantError(f"ONNX Runtime cannot load {os.fspath(path)}: {str(e).splitlines()[0]}") from None


def _input_specs(model_path: str) -> list[tuple[str, list[int | None], np.dtype]]:
    """(name, shape with None for symbolic dims, numpy dtype) of every graph input that is not an initializer."""
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out.append((vi.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def _samples(calibration: Calibration, n_inputs: int) -> list[list[np.ndarray]]:
    """Calibration data as one list of batch-first arrays per graph input (order of the data source)."""
    per_input: list[list[np.ndarray]] = [[] for _ in range(n_inputs)]
    items = (b.inputs for b in calibration.batches(CALIB_BATCH)) if hasattr(calibration, "batches") else calibration
    for item in items:
        arrays = (item,) if isinstance(item, np.ndarray) else tuple(item)
        if len(arrays) != n_inputs:
            raise OrtQuantError(f"a calibration item has {len(arrays)} arrays but the model has {n_inputs} inputs")
        for k, a in enumerate(arrays):
            per_input[k].append(np.asarray(a))
    if not per_input[0]:
        raise OrtQuantError("the calibration data is empty: give at least one input sample")
    return per_input


def calibration_feeds(model_path: str, calibration: Calibration, batch_size: int = CALIB_BATCH) -> list[dict]:
    """The calibration data as ORT feeds: batched to the model's fixed batch size (or `batch_size` if free)."""
    specs = _input_specs(model_path)
    per_input = _samples(calibration, len(specs))
    stacked = []
    for (name, dims, dtype), arrays in zip(specs, per_input):
        rank = len(dims)
        fixed = [a[None] if a.ndim == rank - 1 else a for a in arrays]  # single samples without a batch axis
        for a in fixed:
            bad = a.ndim != rank or any(d is not None and s != d for s, d in zip(a.shape[1:], dims[1:]))
            if bad:
                want = ",".join("?" if d is None else str(d) for d in dims)
                raise OrtQuantError(f"calibration array of shape {a.shape} does not fit model input {name!r} "
                                    f"[{want}]; give batch-first arrays of the model's input shape")
        stacked.append(np.concatenate(fixed).astype(dtype, copy=False))
    n = stacked[0].shape[0]
    if any(s.shape[0] != n for s in stacked):
        raise OrtQuantError(f"calibration inputs have different sample counts {[s.shape[0] for s in stacked]}")
    fixed_bs = specs[0][1][0] if specs[0][1] else None
    bs = fixed_bs or batch_size
    if fixed_bs and n < fixed_bs:
        raise OrtQuantError(f"{n} calibration samples are fewer than the model's fixed batch size {fixed_bs}")
    if fixed_bs and n % fixed_bs:
        warnings.warn(f"ORT calibration uses {n - n % bs} of {n} samples: the model fixes its batch size to {bs}",
                      stacklevel=2)
    end = n - n % bs if fixed_bs else n
    return [{name: s[i:i + bs] for (name, _, _), s in zip(specs, stacked)} for i in range(0, end, bs)]


class _Reader:
    """ORT's CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds, self.pos = feeds, 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _chunks(feeds: list[dict]) -> list[list[dict]]:
    """Feeds in rounds of at most MAX_IN_MEMORY samples: ORT's calibrators hold every activation of a round."""
    per_round = max(1, MAX_IN_MEMORY // next(iter(feeds[0].values())).shape[0])
    return [feeds[i:i + per_round] for i in range(0, len(feeds), per_round)]


def _kind(method: str):
    """slimc's method name -> ORT's CalibrationMethod."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _calibrate(model: str, feeds: list[dict], method: str, options: Mapping[str, object], tmp: str):
    """ORT's calibrator for `method` run over the feeds round by round; the tensor ranges (TensorsData)."""
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates by default
    cal = create_calibrator(model, ops, augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                            calibrate_method=_kind(method), extra_options=dict(options))
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        for chunk in _chunks(feeds):  # ranges and histograms merge across rounds
            cal.collect_data(_Reader(chunk))
        return cal.compute_data()


def _preprocess(src: str, dst: str) -> str:
    """ORT's quant_pre_process (shape inference, BN/constant folding); the input unchanged if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(src, dst, skip_symbolic_shape=True)
        return dst
    except Exception as e:  # ORT's optimizer and onnx shape inference raise many unrelated types
        warnings.warn(f"ORT quant_pre_process failed on {src} ({str(e).splitlines()[0]}); quantizing it as is",
                      stacklevel=3)
        return src


def quantize_with_ort(onnx_fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                      calibration: Calibration, method: str = "minmax", *, preprocess: bool = True,
                      batch_size: int = CALIB_BATCH, nodes_to_exclude: Sequence[str] = (),
                      calibrator_options: Mapping[str, object] | None = None) -> str:
    """Static int8 QDQ model (u8 activations, per-channel s8 weights) calibrated on `calibration`; returns out_path.

    `calibrator_options` replace CALIBRATOR_OPTIONS[method] (ORT's create_calibrator options: num_bins,
    num_quantized_bins, percentile, symmetric, ...).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS:
        raise OrtQuantError(f"unknown calibration method {method!r}; ONNX Runtime offers {', '.join(METHODS)}")
    src, out = os.fspath(onnx_fp32_path), os.fspath(out_path)
    if not os.path.isfile(src):
        raise OrtQuantError(f"ONNX model {src} does not exist")
    feeds = calibration_feeds(src, calibration, batch_size)
    part = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp")
    with tempfile.TemporaryDirectory(prefix="slimc-ortq-") as tmp:
        try:
            model = _preprocess(src, os.path.join(tmp, "pre.onnx")) if preprocess else src
            cache = os.path.join(tmp, "ranges.json")
            options = CALIBRATOR_OPTIONS[method] if calibrator_options is None else calibrator_options
            save_tensors_data(_calibrate(model, feeds, method, options, tmp), cache)
            quantize_static(model, part, None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_kind(method), nodes_to_exclude=list(nodes_to_exclude) or None,
                            calibration_cache_path=cache)
            os.replace(part, out)
        except SlimcError:
            raise
        except OSError as e:
            raise OrtQuantError(f"cannot write the quantized model to {out}: {e}") from None
        except Exception as e:  # ORT's quantizer raises ValueError/RuntimeError/onnx errors alike
            raise OrtQuantError(f"ONNX Runtime could not quantize {src} ({method}): "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            if os.path.exists(part):
                os.remove(part)
    return out
