"""Unlabelled or labelled model inputs for calibration, BN re-estimation and distillation (`--calib`, `--data`).

A `Dataset` yields batches of graph inputs (one numpy array per graph input) with optional labels, and has a
content fingerprint so that results computed from it (calibration statistics) can be cached.

`load_data(spec, graph)` reads the SPEC of `--data`/`--calib`:

- `inputs.npy`: one array, batch first, for a one-input graph (no labels).
- `data.npz`: inputs under `x` or `inputs` (or one key per graph input name), labels under `y` or `labels`.
- `package.module:callable`: called with no arguments each time the data is read; it returns a list or generator
  of batches (or a `Dataset`). A batch is an array, or a tuple `(x, y)` with `x` an array (a tuple of arrays for
  several graph inputs) and `y` integer labels or None. A returned tuple is one batch, e.g. `return (x, y)`.
- `DIR` or `DIR:option=value,...`: a folder of images (png, jpg, bmp, gif, tif, webp, ppm/pgm), read lazily in
  sorted path order. Images in sub-folders are labelled by sub-folder (the folder name itself when every folder
  name is an integer, else its index in sorted order); images at the top level are unlabelled. Options:
  `resize=S` (shorter side to S) or `resize=HxW`; `crop=S` or `crop=HxW` (centre crop); with neither, images are
  resized to the graph input's height and width. `scale=1/255` (the default) multiplies the 0..255 pixels, then
  `mean=...` is subtracted and the result divided by `std=...` (one value, or one per channel:
  `mean=0.485,0.456,0.406,std=0.229,0.224,0.225`). `mode=RGB|L` (default: from the input's channel count),
  `layout=nchw|nhwc` (default: guessed from the input shape), `labels=none` to ignore sub-folders, `limit=N` to
  use N evenly spaced images.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from slimc.errors import SlimcError

if TYPE_CHECKING:
    from slimc.ir import Graph, TensorType


class DataError(SlimcError):
    """A data source cannot be read or does not fit the model's inputs."""


@dataclass(frozen=True)
class Batch:
    """One batch: an array per graph input (batch first) and optional integer labels."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])


class Dataset(Protocol):
    """What passes read from `PassContext.data`."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[Batch]: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class ArrayDataset:
    """Samples held in memory: arrays[i] has one row per sample for graph input i."""

    arrays: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None
    name: str = "arrays"
    _fp: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = {int(a.shape[0]) for a in self.arrays}
        if len(n) != 1:
            raise DataError(f"data {self.name}: inputs have different sample counts {sorted(n)}")
        if self.labels is not None and len(self.labels) != next(iter(n)):
            raise DataError(f"data {self.name}: {len(self.labels)} labels for {next(iter(n))} samples")

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        for s in range(0, len(self), batch_size):
            labels = None if self.labels is None else self.labels[s:s + batch_size]
            yield Batch(tuple(a[s:s + batch_size] for a in self.arrays), labels)

    def take(self, indices: Sequence[int]) -> Batch:
        """The samples at `indices` as one batch (for shuffled reading)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Batch(tuple(a[idx] for a in self.arrays), None if self.labels is None else self.labels[idx])

    def fingerprint(self) -> str:
        if not self._fp:
            h = hashlib.sha256()
            for a in (*self.arrays, *(() if self.labels is None else (self.labels,))):
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
            self._fp.append(h.hexdigest()[:16])
        return self._fp[0]


def from_arrays(arrays: Sequence[np.ndarray], labels: np.ndarray | None = None, name: str = "arrays") -> ArrayDataset:
    return ArrayDataset(tuple(np.asarray(a) for a in arrays), None if labels is None else np.asarray(labels), name)


def check_batch_size(batch_size: int) -> None:
    """Reject a non-positive batch size early (it would otherwise loop forever or yield nothing)."""
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")


def iter_batches(ds: Dataset, batch_size: int, seed: int | None = None) -> Iterator[Batch]:
    """Batches in a seeded random order when the dataset allows random access (`take`), else in its own order."""
    check_batch_size(batch_size)
    take = getattr(ds, "take", None)
    if seed is None or take is None:
        yield from ds.batches(batch_size)
        return
    order = np.random.default_rng(seed).permutation(len(ds))
    for s in range(0, len(order), batch_size):
        yield take(order[s:s + batch_size])


# ---- fitting arrays to the graph's inputs ----------------------------------------------------------

Inputs = tuple[tuple[str, "TensorType"], ...]


def _fit(arrays: Sequence[Any], inputs: Inputs, gname: str, where: str) -> tuple[np.ndarray, ...]:
    """Cast to the graph's input dtypes; check the count, rank and static non-batch dims of every array."""
    names = ", ".join(f"%{n}: {t}" for n, t in inputs)
    if len(arrays) != len(inputs):
        raise DataError(f"{where}: gives {len(arrays)} input array(s) per batch but graph {gname} takes "
                        f"{len(inputs)} ({names}); give one array per graph input")
    out = []
    for arr, (name, t) in zip(arrays, inputs):
        a = np.asarray(arr)
        fits = a.ndim == t.rank and a.ndim >= 1 and all(
            not isinstance(d, int) or d == s for d, s in zip(t.shape[1:], a.shape[1:]))
        if not fits:
            raise DataError(f"{where}: data of shape {list(a.shape)} does not fit input %{name}: {t} of graph "
                            f"{gname} (batch first; every dimension but the first must match); reshape the data "
                            "or give the model the input shape of the data (--input-shape)")
        dtype = np.dtype(t.dtype)
        if a.dtype != dtype:
            if np.issubdtype(dtype, np.integer) and not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{where}: input %{name} of graph {gname} is {dtype} but the data is {a.dtype}")
            a = a.astype(dtype)
        out.append(a)
    return tuple(out)


def _fit_labels(y: Any, n: int, where: str) -> np.ndarray:
    """Integer class labels, one per sample."""
    a = np.asarray(y)
    if a.ndim != 1 or len(a) != n:
        raise DataError(f"{where}: labels of shape {list(a.shape)} for {n} samples; give one integer label per sample")
    if not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a))):
            raise DataError(f"{where}: labels must be integer class indices, got {a.dtype}")
    return a.astype(np.int64)


# ---- .npy / .npz ------------------------------------------------------------------------------------

def _np_load(path: str, where: str) -> Any:
    if not os.path.isfile(path):
        raise DataError(f"{where}: file {path} does not exist; check the path")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read {path} as a numpy file: {e}; write it with numpy.save/savez") from None


def _from_npy(path: str, inputs: Inputs, gname: str, where: str) -> ArrayDataset:
    arr = _np_load(path, where)
    return ArrayDataset(_fit((arr,), inputs, gname, where), None, path)


def _from_npz(path: str, inputs: Inputs, gname: str, where: str) -> ArrayDataset:
    with _np_load(path, where) as z:
        keys = list(z.files)
        names = [n for n, _ in inputs]
        if all(n in keys for n in names):
            xs = [z[n] for n in names]
        elif len(inputs) == 1 and ("x" in keys or "inputs" in keys):
            xs = [z["x" if "x" in keys else "inputs"]]
        else:
            want = "'x' or 'inputs'" if len(inputs) == 1 else "one key per graph input: " + ", ".join(names)
            raise DataError(f"{where}: {path} has keys {keys}; it needs {want} (and optionally 'y' or 'labels')")
        y = z["y"] if "y" in keys else z["labels"] if "labels" in keys else None
    fitted = _fit(xs, inputs, gname, where)
    return ArrayDataset(fitted, None if y is None else _fit_labels(y, len(fitted[0]), where), path)


# ---- image folders ----------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
_IMAGE_OPTIONS = ("resize", "crop", "scale", "mean", "std", "mode", "layout", "labels", "limit")


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes one input sample: resize, centre crop, scale, normalize, channel layout."""

    size: tuple[int, int]  # the (H, W) the samples must have
    resize: tuple[int, ...] | None = None  # (shorter side,) or (H, W)
    crop: tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    mode: str = "RGB"
    layout: str = "nchw"

    def text(self) -> str:
        """Canonical form (part of the data fingerprint)."""
        fmt = lambda s: "x".join(map(str, s)) if s else "-"  # noqa: E731
        return (f"resize={fmt(self.resize)},crop={fmt(self.crop)},scale={self.scale!r},mean={self.mean},"
                f"std={self.std},mode={self.mode},layout={self.layout}")

    def __call__(self, img: Any, path: str) -> np.ndarray:
        from PIL import Image

        img = img.convert(self.mode)
        if self.resize is not None or self.crop is None:
            w, h = img.size
            if self.resize is None:
                new = (self.size[1], self.size[0])
            elif len(self.resize) == 1:  # shorter side, as torchvision's Resize(int)
                s = self.resize[0]
                new = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
            else:
                new = (self.resize[1], self.resize[0])
            if new != (w, h):
                img = img.resize(new, Image.BILINEAR)
        if self.crop is not None:
            (ch, cw), (w, h) = self.crop, img.size
            if ch > h or cw > w:
                raise DataError(f"image {path} is {h}x{w} (HxW) after resizing, smaller than crop={ch}x{cw}; "
                                "resize it to at least the crop size (resize=...)")
            top, left = int(round((h - ch) / 2)), int(round((w - cw) / 2))
            img = img.crop((left, top, left + cw, top + ch))
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 2:
            a = a[:, :, None]
        a = (a * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1) if self.layout == "nchw" else a)


def _split_options(text: str, where: str) -> dict[str, str]:
    """'resize=256,crop=224,mean=0.5,0.5,0.5' -> {'resize': '256', ..., 'mean': '0.5,0.5,0.5'}."""
    out: dict[str, str] = {}
    key = None
    for tok in (t.strip() for t in text.split(",")):
        if "=" in tok:
            key, _, val = tok.partition("=")
            key = key.strip().lower()
            if key not in _IMAGE_OPTIONS:
                raise DataError(f"{where}: unknown image option {key!r}; the options are {', '.join(_IMAGE_OPTIONS)}")
            if key in out:
                raise DataError(f"{where}: image option {key} given twice")
            out[key] = val.strip()
        elif tok:
            if key is None:
                raise DataError(f"{where}: image options must be key=value (e.g. resize=256,crop=224), got {tok!r}")
            out[key] += "," + tok
    return out


def _size(text: str, key: str, where: str) -> tuple[int, ...]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not m or int(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) <= 0):
        raise DataError(f"{where}: {key}={text!r} is not a size: give S or HxW (e.g. {key}=224 or {key}=224x224)")
    return (int(m.group(1)),) if m.group(2) is None else (int(m.group(1)), int(m.group(2)))


def _number(text: str, key: str, where: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise DataError(f"{where}: {key}={text!r} is not a number (fractions such as 1/255 are fine)") from None


def _per_channel(text: str, key: str, channels: int, where: str) -> tuple[float, ...]:
    vals = tuple(_number(v, key, where) for v in text.split(","))
    if len(vals) not in (1, channels):
        raise DataError(f"{where}: {key} has {len(vals)} values; give one, or one per channel ({channels})")
    if key == "std" and any(v == 0 for v in vals):
        raise DataError(f"{where}: std must not be zero")
    return vals


def _image_input(inputs: Inputs, gname: str, layout: str | None, where: str) -> tuple[str, int, tuple[Any, Any]]:
    """(layout, channels, (H, W)) of the graph's single 4-D image input."""
    if len(inputs) != 1 or inputs[0][1].rank != 4:
        raise DataError(f"{where}: a folder of images feeds one 4-D image input, but graph {gname} takes "
                        f"{', '.join(f'%{n}: {t}' for n, t in inputs)}; pass .npy/.npz data or a module:callable")
    shape = inputs[0][1].shape
    if layout is None:
        if isinstance(shape[1], int) and shape[1] in (1, 3, 4):
            layout = "nchw"
        elif isinstance(shape[3], int) and shape[3] in (1, 3, 4):
            layout = "nhwc"
        else:
            raise DataError(f"{where}: cannot tell the channel axis of input {inputs[0][1]}; add layout=nchw or "
                            "layout=nhwc")
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if not isinstance(c, int):
        raise DataError(f"{where}: the channel count of input {inputs[0][1]} is not fixed; import the model "
                        "with a fixed --input-shape")
    return layout, c, (h, w)


def _preprocess(opts: dict[str, str], inputs: Inputs, gname: str, where: str) -> Preprocess:
    layout = opts.get("layout", "").lower() or None
    if layout not in (None, "nchw", "nhwc"):
        raise DataError(f"{where}: layout={layout!r} must be nchw or nhwc")
    layout, channels, (h, w) = _image_input(inputs, gname, layout, where)
    mode = opts.get("mode", {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, ""))
    if _MODE_CHANNELS.get(mode) != channels:
        raise DataError(f"{where}: input {inputs[0][1]} has {channels} channels; mode={mode or '?'} gives "
                        f"{_MODE_CHANNELS.get(mode, 'an unknown number of')} (modes: L=1, RGB=3, RGBA=4)")
    resize = _size(opts["resize"], "resize", where) if "resize" in opts else None
    crop = _size(opts["crop"], "crop", where) if "crop" in opts else None
    crop = crop * 2 if crop is not None and len(crop) == 1 else crop
    if resize is None and crop is None and not (isinstance(h, int) and isinstance(w, int)):
        raise DataError(f"{where}: input {inputs[0][1]} has no fixed height and width; give resize= or crop=")
    return Preprocess(
        size=(h, w), resize=resize, crop=crop,  # type: ignore[arg-type]
        scale=_number(opts["scale"], "scale", where) if "scale" in opts else 1 / 255,
        mean=_per_channel(opts["mean"], "mean", channels, where) if "mean" in opts else (0.0,),
        std=_per_channel(opts["std"], "std", channels, where) if "std" in opts else (1.0,),
        mode=mode, layout=layout)


@dataclass(frozen=True, eq=False)
class ImageFolderDataset:
    """Image files read lazily (one batch at a time) in sorted path order, with labels from sub-folders."""

    root: str
    files: tuple[str, ...]  # relative to root, '/'-separated
    labels: tuple[int, ...] | None
    classes: tuple[str, ...]
    prep: Preprocess
    dtype: str = "float32"
    name: str = "images"
    _fp: list = field(default_factory=list, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        """One preprocessed sample (no batch axis)."""
        from PIL import Image, UnidentifiedImageError

        path = os.path.join(self.root, self.files[i])
        try:
            with Image.open(path) as img:
                return self.prep(img, path).astype(self.dtype, copy=False)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"data {self.name}: cannot read image {path}: {e}; remove or replace the file") from None

    def take(self, indices: Sequence[int]) -> Batch:
        samples = [self.load(int(i)) for i in indices]
        shapes = {s.shape for s in samples}
        if len(shapes) > 1:
            raise DataError(f"data {self.name}: images come out in different sizes {sorted(shapes)} after "
                            f"{self.prep.text()}; add crop=... so that every image has the input's size")
        labels = None if self.labels is None else np.asarray([self.labels[int(i)] for i in indices], np.int64)
        return Batch((np.stack(samples),), labels)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        for s in range(0, len(self), batch_size):
            yield self.take(range(s, min(s + batch_size, len(self))))

    def fingerprint(self) -> str:
        """From file names, sizes and modification times, the labels and the preprocessing."""
        if not self._fp:
            h = hashlib.sha256(f"images|{self.prep.text()}|{self.dtype}|{self.labels}".encode())
            for f in self.files:
                st = os.stat(os.path.join(self.root, f))
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            self._fp.append(h.hexdigest()[:16])
        return self._fp[0]


def _label_of(classes: Sequence[str]) -> dict[str, int]:
    """Folder name -> label: the integer itself when every name is one, else the index in sorted order."""
    if all(re.fullmatch(r"\d+", c) for c in classes):
        return {c: int(c) for c in classes}
    return {c: i for i, c in enumerate(sorted(classes))}


def image_folder(root: str, options: str, inputs: Inputs, gname: str, where: str) -> ImageFolderDataset:
    """A lazily read image folder; the first image is read now to check it fits the graph input."""
    opts = _split_options(options, where)
    prep = _preprocess(opts, inputs, gname, where)
    files: list[str] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        rel = os.path.relpath(d, root)
        for n in names:
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS):
                files.append(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")
    files.sort()
    if not files:
        raise DataError(f"{where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {root}")
    use_labels = opts.get("labels", "folders").lower()
    if use_labels not in ("folders", "none"):
        raise DataError(f"{where}: labels={use_labels!r} must be folders or none")
    top = [f for f in files if "/" not in f]
    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] = ()
    if use_labels == "folders" and len(top) < len(files):
        if top:
            raise DataError(f"{where}: {root} has images both at the top level (e.g. {top[0]}) and in sub-folders; "
                            "put every image in a class folder, or add labels=none")
        classes = tuple(sorted({f.split("/", 1)[0] for f in files}))
        label_of = _label_of(classes)
        labels = tuple(label_of[f.split("/", 1)[0]] for f in files)
    if "limit" in opts:
        if not re.fullmatch(r"\d+", opts["limit"]) or int(opts["limit"]) <= 0:
            raise DataError(f"{where}: limit={opts['limit']!r} must be a positive integer")
        n = int(opts["limit"])
        if n < len(files):
            keep = np.unique(np.linspace(0, len(files) - 1, n).round().astype(int))
            files = [files[i] for i in keep]
            labels = None if labels is None else tuple(labels[i] for i in keep)
    ds = ImageFolderDataset(root, tuple(files), labels, classes, prep, inputs[0][1].dtype, where.split(" ", 1)[-1])
    _fit((ds.take([0]).inputs[0],), inputs, gname, f"{where} (image {files[0]} after {prep.text()})")
    return ds


def _split_folder(spec: str) -> tuple[str, str] | None:
    """(folder, options) if `spec` is 'DIR' or 'DIR:options' with an existing DIR."""
    if os.path.isdir(spec):
        return spec, ""
    for i, ch in enumerate(spec):
        if ch == ":" and i and os.path.isdir(spec[:i]):
            return spec[:i], spec[i + 1:]
    return None


# ---- module:callable --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CallableDataset:
    """Batches produced by a user's callable, re-batched to the requested size; called anew on every read."""

    fn: Callable[[], Any]
    inputs: Inputs
    gname: str
    name: str
    _scan: list = field(default_factory=list, compare=False, repr=False)

    def _items(self, result: Any = None) -> Iterator[Batch]:
        where = f"data {self.name}"
        result = self.fn() if result is None else result
        items: Iterable[Any] = [result] if isinstance(result, (tuple, np.ndarray)) else result
        try:
            it = iter(items)
        except TypeError:
            raise DataError(f"{where} returned {type(result).__name__}; return a list or generator of batches "
                            "(arrays or (x, y) tuples)") from None
        for k, item in enumerate(it):
            x, y = item if isinstance(item, tuple) else (item, None)
            if isinstance(item, tuple) and len(item) != 2:
                raise DataError(f"{where}: batch {k} is a tuple of {len(item)}; give an array or an (x, y) tuple")
            arrays = _fit(list(x) if isinstance(x, (tuple, list)) else [x], self.inputs, self.gname,
                          f"{where}, batch {k}")
            yield Batch(arrays, None if y is None else _fit_labels(y, len(arrays[0]), f"{where}, batch {k}"))

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        return _rebatch(self._items(), batch_size, self.name)

    def _count_and_hash(self) -> tuple[int, str]:
        if not self._scan:
            n, h = 0, hashlib.sha256(b"callable")
            for b in self._items():
                n += len(b)
                for a in (*b.inputs, *(() if b.labels is None else (b.labels,))):
                    h.update(f"{a.dtype}{a.shape[1:]}".encode())
                    h.update(np.ascontiguousarray(a).tobytes())
            self._scan.append((n, h.hexdigest()[:16]))
        return self._scan[0]

    def __len__(self) -> int:
        return self._count_and_hash()[0]

    def fingerprint(self) -> str:
        """From the content (one pass over the data, cached)."""
        return self._count_and_hash()[1]


def _slice_batch(b: Batch, s: int, e: int) -> Batch:
    return Batch(tuple(a[s:e] for a in b.inputs), None if b.labels is None else b.labels[s:e])


def _concat(parts: Sequence[Batch], name: str) -> Batch:
    if len(parts) == 1:
        return parts[0]
    if len({b.labels is None for b in parts}) > 1:
        raise DataError(f"data {name}: some batches have labels and others do not; give labels for all or none")
    inputs = tuple(np.concatenate([b.inputs[i] for b in parts]) for i in range(len(parts[0].inputs)))
    return Batch(inputs, None if parts[0].labels is None else np.concatenate([b.labels for b in parts]))


def _rebatch(items: Iterable[Batch], batch_size: int, name: str) -> Iterator[Batch]:
    """Batches of exactly `batch_size` (the last may be smaller), holding at most one source batch extra."""
    pending: list[Batch] = []
    count = 0
    for b in items:
        if not len(b):
            continue
        pending.append(b)
        count += len(b)
        if count < batch_size:
            continue
        merged = _concat(pending, name)
        s = 0
        while count - s >= batch_size:
            yield _slice_batch(merged, s, s + batch_size)
            s += batch_size
        pending = [_slice_batch(merged, s, count)] if s < count else []
        count -= s
    if count:
        yield _concat(pending, name)


def _from_callable(spec: str, inputs: Inputs, gname: str, where: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory are importable
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise DataError(f"{where}: cannot import module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{where}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{where}: {attr} is a {type(obj).__name__}, not a callable returning batches")
    ds = CallableDataset(obj, inputs, gname, spec)
    first = obj()
    if all(hasattr(first, a) for a in ("batches", "fingerprint", "__len__")):  # the callable built a Dataset
        b = next(iter(first.batches(1)), None)
        if b is not None:
            _fit(b.inputs, inputs, gname, where)
        return first
    if next(ds._items(first), None) is None:  # checks the first batch's shapes
        raise DataError(f"{where}: the callable produced no batches")
    return ds


# ---- entry point ------------------------------------------------------------------------------------

def load_data(spec: str, graph: Graph, option: str = "--data") -> Dataset:
    """Read `--data`/`--calib` SPEC (see the module docstring) and check it against the graph's inputs."""
    where = f"{option} {spec}"
    inputs: Inputs = tuple(graph.inputs)
    low = spec.strip().lower()
    if low.endswith(".npy"):
        return _from_npy(spec, inputs, graph.name, where)
    if low.endswith(".npz"):
        return _from_npz(spec, inputs, graph.name, where)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", spec):  # before folders: image options always have '='
        return _from_callable(spec, inputs, graph.name, where)
    folder = _split_folder(spec)
    if folder is not None:
        return image_folder(folder[0], folder[1], inputs, graph.name, where)
    hint = f" ({spec.split(':', 1)[0]} is not a folder)" if ":" in spec else " (no such file or folder)"
    raise DataError(f"{where}: cannot tell what this data is{hint}: pass a .npy or .npz file, a folder of images "
                    "(DIR or DIR:resize=256,crop=224,mean=...,std=...), or package.module:callable returning batches")
