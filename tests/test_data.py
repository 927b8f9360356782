"""`--data`/`--calib` sources (slimc.data.load_data): .npy/.npz, image folders, module:callable, checked against
the graph's inputs, with lazy image reading, deterministic order and fingerprints."""

import os
import textwrap

import numpy as np
import pytest
from PIL import Image

from slimc import ir
from slimc.data import DataError, from_arrays, iter_batches, load_data

ONE = """\
graph @one(%x: f32[N,3,8,8]) {
  param %w: f32[4,3,3,3]
  %c: f32[N,4,8,8] = conv2d(%x, %w) {padding=[1,1,1,1]}
  return %c
}
"""

GRAY = """\
graph @gray(%x: f32[N,1,6,6]) {
  %r: f32[N,1,6,6] = relu(%x)
  return %r
}
"""

NHWC = """\
graph @nhwc(%x: f32[N,8,8,3]) {
  %r: f32[N,8,8,3] = relu(%x)
  return %r
}
"""

TWO = """\
graph @two(%a: f32[N,3], %b: f32[N,5]) {
  %s: f32[N,3] = relu(%a)
  %t: f32[N,5] = relu(%b)
  return %s, %t
}
"""


def graph(text: str = ONE) -> ir.Graph:
    g = ir.parse_graph(text)
    rng = np.random.default_rng(0)
    return g.replace(weights={k: rng.standard_normal(t.shape).astype("float32") for k, t in g.param_types.items()})


def collect(ds, batch_size):
    xs, ys = [], []
    for b in ds.batches(batch_size):
        xs.append(b.inputs[0])
        ys.append(b.labels)
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


# ---- .npy / .npz -------------------------------------------------------------------------------------

def test_npy_is_cast_to_the_input_dtype_and_batched(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8))  # float64 on disk
    np.save(tmp_path / "x.npy", x)
    ds = load_data(str(tmp_path / "x.npy"), graph())
    assert len(ds) == 10
    sizes = [len(b) for b in ds.batches(4)]
    assert sizes == [4, 4, 2]
    got, labels = collect(ds, 4)
    assert got.dtype == np.float32 and labels is None
    np.testing.assert_allclose(got, x.astype(np.float32))


def test_npy_of_the_wrong_shape_names_the_file_and_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 9, 8), np.float32))
    with pytest.raises(DataError, match=r"--calib .*x\.npy.*\[4, 3, 9, 8\].*%x: f32\[N,3,8,8\]"):
        load_data(str(tmp_path / "x.npy"), graph(), "--calib")
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.npy"), graph())
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(DataError, match="cannot read .*bad.npy"):
        load_data(str(tmp_path / "bad.npy"), graph())


def test_npz_inputs_and_labels_under_either_key(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    y = np.arange(6) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", inputs=x, labels=y.astype(np.float64))
    for name in ("a.npz", "b.npz"):
        got, labels = collect(load_data(str(tmp_path / name), graph()), 4)
        np.testing.assert_array_equal(got, x)
        assert labels.dtype == np.int64 and labels.tolist() == y.tolist()


def test_npz_errors_say_which_keys_are_needed(tmp_path):
    x = np.zeros((6, 3, 8, 8), np.float32)
    np.savez(tmp_path / "k.npz", data=x)
    with pytest.raises(DataError, match=r"keys \['data'\].*'x' or 'inputs'"):
        load_data(str(tmp_path / "k.npz"), graph())
    np.savez(tmp_path / "n.npz", x=x, y=np.arange(5))
    with pytest.raises(DataError, match="labels of shape \\[5\\] for 6 samples"):
        load_data(str(tmp_path / "n.npz"), graph())
    np.savez(tmp_path / "f.npz", x=x, y=np.full(6, 0.5))
    with pytest.raises(DataError, match="integer class indices"):
        load_data(str(tmp_path / "f.npz"), graph())


def test_npz_with_one_key_per_input_of_a_two_input_graph(tmp_path):
    a, b = np.ones((4, 3), np.float32), np.full((4, 5), 2, np.float32)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    batch = next(load_data(str(tmp_path / "two.npz"), graph(TWO)).batches(8))
    np.testing.assert_array_equal(batch.inputs[0], a)
    np.testing.assert_array_equal(batch.inputs[1], b)
    np.savez(tmp_path / "x.npz", x=a)
    with pytest.raises(DataError, match="one key per graph input: a, b"):
        load_data(str(tmp_path / "x.npz"), graph(TWO))


# ---- image folders ----------------------------------------------------------------------------------

def write_image(path, h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return arr


def test_image_folder_preprocessing_matches_a_hand_computation(tmp_path):
    write_image(tmp_path / "img" / "b.png", 12, 10, 0)  # portrait: shorter side is the width
    write_image(tmp_path / "img" / "a.png", 10, 16, 1)
    spec = f"{tmp_path / 'img'}:resize=9,crop=8,mean=0.5,0.4,0.3,std=0.2,0.25,0.5"
    ds = load_data(spec, graph())
    assert len(ds) == 2 and ds.files == ("a.png", "b.png") and ds.labels is None
    x, _ = collect(ds, 8)
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    with Image.open(tmp_path / "img" / "b.png") as im:  # 10 wide x 12 high -> 9 x 10 (int(9*12/10)) -> crop 8
        im = im.convert("RGB").resize((9, 10), Image.BILINEAR)
        top, left = int(round((10 - 8) / 2)), int(round((9 - 8) / 2))
        ref = np.asarray(im.crop((left, top, left + 8, top + 8)), np.float32) / 255
    ref = ((ref - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]).transpose(2, 0, 1)
    np.testing.assert_allclose(x[1], ref, rtol=1e-5, atol=1e-5)


def test_image_folder_defaults_resize_to_the_input_and_scale_to_unit_range(tmp_path):
    arr = write_image(tmp_path / "img" / "only.png", 8, 8, 2).astype(np.float64)
    x, _ = collect(load_data(str(tmp_path / "img"), graph()), 4)
    np.testing.assert_allclose(x[0], arr.transpose(2, 0, 1) / 255, atol=1e-6)
    x, _ = collect(load_data(f"{tmp_path / 'img'}:scale=1,mean=127,std=128", graph()), 4)
    np.testing.assert_allclose(x[0], (arr.transpose(2, 0, 1) - 127) / 128, atol=1e-5)


def test_grayscale_and_channels_last_inputs(tmp_path):
    write_image(tmp_path / "g" / "a.png", 6, 6, 3, mode="L")
    x, _ = collect(load_data(str(tmp_path / "g"), graph(GRAY)), 2)
    assert x.shape == (1, 1, 6, 6)
    write_image(tmp_path / "c" / "a.png", 11, 8, 4)
    x, _ = collect(load_data(f"{tmp_path / 'c'}:crop=8", graph(NHWC)), 2)
    assert x.shape == (1, 8, 8, 3)


def test_labels_from_sub_folders(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            write_image(tmp_path / "named" / cls / f"{i}.png", 8, 8, i)
    ds = load_data(str(tmp_path / "named"), graph())
    assert ds.classes == ("cat", "dog")
    _, labels = collect(ds, 2)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    for cls in ("3", "10"):  # integer folder names are the labels themselves
        write_image(tmp_path / "digits" / cls / "a.png", 8, 8, 0)
    _, labels = collect(load_data(str(tmp_path / "digits"), graph()), 4)
    assert labels.tolist() == [10, 3]  # sorted paths: "10/a.png" < "3/a.png"
    _, labels = collect(load_data(f"{tmp_path / 'digits'}:labels=none", graph()), 4)
    assert labels is None


def test_image_folder_reads_lazily_in_a_deterministic_order(tmp_path):
    for i in range(6):
        write_image(tmp_path / "img" / f"{i:02d}.png", 8, 8, i)
    ds = load_data(str(tmp_path / "img"), graph())
    first, _ = collect(ds, 6)
    os.remove(tmp_path / "img" / "05.png")  # only read when its batch is
    it = ds.batches(2)
    np.testing.assert_array_equal(next(it).inputs[0], first[:2])
    np.testing.assert_array_equal(next(it).inputs[0], first[2:4])
    with pytest.raises(DataError, match="cannot read image .*05.png"):
        next(it)


def test_image_folder_fingerprint_follows_files_and_spec(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png", 8, 8, i)
    root = str(tmp_path / "img")
    fp = load_data(root, graph()).fingerprint()
    assert load_data(root, graph()).fingerprint() == fp
    assert load_data(f"{root}:scale=1", graph()).fingerprint() != fp
    st = os.stat(tmp_path / "img" / "1.png")
    os.utime(tmp_path / "img" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_data(root, graph()).fingerprint() != fp


def test_image_folder_limit_takes_evenly_spaced_images(tmp_path):
    for cls in "ab":
        for i in range(4):
            write_image(tmp_path / "img" / cls / f"{i}.png", 8, 8, i)
    ds = load_data(f"{tmp_path / 'img'}:limit=2", graph())
    assert ds.files == ("a/0.png", "b/3.png") and ds.labels == (0, 1)


def test_image_folder_errors(tmp_path):
    write_image(tmp_path / "img" / "a.png", 12, 10, 0)
    write_image(tmp_path / "img" / "b.png", 10, 14, 1)
    root = str(tmp_path / "img")
    with pytest.raises(DataError, match="unknown image option 'size'.*resize, crop"):
        load_data(f"{root}:size=8", graph())
    with pytest.raises(DataError, match="resize='big' is not a size"):
        load_data(f"{root}:resize=big", graph())
    with pytest.raises(DataError, match="smaller than crop=20x20"):
        load_data(f"{root}:crop=20", graph())
    with pytest.raises(DataError, match="mean has 2 values"):
        load_data(f"{root}:mean=0.1,0.2", graph())
    with pytest.raises(DataError, match=r"\[1, 3, 9, 8\].*does not fit input %x"):
        load_data(f"{root}:resize=8", graph())  # 10 wide x 12 high -> 8 x 9
    ds = load_data(f"{root}:resize=8x8,mode=RGB", graph())
    assert len(ds) == 2
    with pytest.raises(DataError, match="mode=L gives 1"):
        load_data(f"{root}:mode=L", graph())
    write_image(tmp_path / "img" / "sub" / "c.png", 8, 8, 2)
    with pytest.raises(DataError, match="both at the top level.*labels=none"):
        load_data(root, graph())
    assert len(load_data(f"{root}:labels=none", graph())) == 3
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        load_data(str(tmp_path / "empty"), graph())
    with pytest.raises(DataError, match="one 4-D image input"):
        load_data(root, graph(TWO))


# ---- module:callable --------------------------------------------------------------------------------

MODULE = '''
import numpy as np

X = np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8)
Y = np.arange(10) % 4
CALLS = []


def gen():
    CALLS.append(1)
    for s in range(0, 10, 3):
        yield X[s:s + 3], Y[s:s + 3]


def listed():
    return [X[:4], X[4:]]


def whole():
    return (X, Y)


def dataset():
    from slimc.data import from_arrays
    return from_arrays([X], Y)


def wrong():
    yield np.zeros((2, 3, 4, 4), np.float32)


NOT_CALLABLE = 3
'''


@pytest.fixture
def datamod(tmp_path, monkeypatch):
    name = f"slimc_test_data_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module(name)


def test_callable_yielding_batches_is_rebatched_and_rereadable(datamod):
    ds = load_data(f"{datamod.__name__}:gen", graph())
    assert [len(b) for b in ds.batches(4)] == [4, 4, 2]
    x, y = collect(ds, 4)
    np.testing.assert_array_equal(x, datamod.X)
    assert y.tolist() == datamod.Y.tolist()
    assert len(ds) == 10 and ds.fingerprint() == load_data(f"{datamod.__name__}:gen", graph()).fingerprint()
    x2, _ = collect(ds, 7)  # a second read calls the generator again
    np.testing.assert_array_equal(x2, datamod.X)


def test_callable_returning_a_list_a_tuple_or_a_dataset(datamod):
    for attr in ("listed", "whole", "dataset"):
        x, y = collect(load_data(f"{datamod.__name__}:{attr}", graph()), 3)
        np.testing.assert_array_equal(x, datamod.X)
        assert (y is None) == (attr == "listed")


def test_callable_errors(datamod):
    with pytest.raises(DataError, match=r"batch 0.*\[2, 3, 4, 4\].*%x"):
        load_data(f"{datamod.__name__}:wrong", graph())
    with pytest.raises(DataError, match="not a callable"):
        load_data(f"{datamod.__name__}:NOT_CALLABLE", graph())
    with pytest.raises(DataError, match="has no attribute 'nope'"):
        load_data(f"{datamod.__name__}:nope", graph())
    with pytest.raises(DataError, match="cannot import module 'no_such_module_xyz'"):
        load_data("no_such_module_xyz:f", graph())


def test_unrecognized_spec_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match=r"--data .*photos.*not a folder.*\.npy or \.npz"):
        load_data(f"{tmp_path}/photos:resize=256", graph())


def test_seeded_shuffle_reads_every_sample_once_and_repeats_by_seed():
    x = np.arange(23, dtype=np.float32)[:, None].repeat(3, 1)
    ds = from_arrays([x], np.arange(23))
    a = [b.labels.tolist() for b in iter_batches(ds, 5, seed=1)]
    assert [len(v) for v in a] == [5, 5, 5, 5, 3]
    assert sorted(sum(a, [])) == list(range(23)) and sum(a, []) != list(range(23))
    assert a == [b.labels.tolist() for b in iter_batches(ds, 5, seed=1)]
    assert a != [b.labels.tolist() for b in iter_batches(ds, 5, seed=2)]
    assert [b.labels.tolist() for b in iter_batches(ds, 5)][0] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="batch size must be positive"):
        list(iter_batches(ds, 0))


def test_a_package_directory_is_a_module_not_an_image_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "slimc_test_pkgdata"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import numpy as np\n\ndef gen():\n    return [np.ones((2, 3, 8, 8))]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, _ = collect(load_data("slimc_test_pkgdata:gen", graph()), 4)
    assert x.shape == (2, 3, 8, 8)
