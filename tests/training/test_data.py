"""sidfast/data.py: every input kind on tiny datasets made here, sharding, bitwise resume, and each error."""
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidfast.training.data import DataError, FileSource, RealData, open_images

N = 10  # images per dataset; image i is filled with the values _pixels(i)


def _pixels(i: int, h: int = 8, w: int = 8, c: int = 3) -> np.ndarray:
    """uint8 (H, W, C): image i's index in the first pixel, a gradient elsewhere (PNG keeps it exactly)."""
    a = (np.arange(h * w * c).reshape(h, w, c) * 3 + 7 * i) % 256
    a[0, 0, :] = i
    return a.astype(np.uint8)


def _float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1


def _index_of(images: torch.Tensor) -> list[int]:
    return ((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def _png(path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a if a.shape[2] == 3 else a[:, :, 0]).save(path)


def _class_folder(root, n=N):
    """Image i in class folder 'a' (even i) or 'b' (odd i)."""
    for i in range(n):
        _png(root / ("a" if i % 2 == 0 else "b") / f"{i:02d}.png", _pixels(i))
    return root


def _edm_zip(path, n=N, labels=True):
    """EDM dataset_tool layout: 00000/img00000000.png ... and dataset.json."""
    with zipfile.ZipFile(path, "w") as zf:
        names = []
        for i in range(n):
            name = f"00000/img{i:08d}.png"
            buf = _png_bytes(_pixels(i))
            zf.writestr(name, buf)
            names.append(name)
        meta = {"labels": [[name, i % 3] for i, name in enumerate(names)] if labels else None}
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _all(source):
    return source.read(list(range(len(source))))


# ---- each input kind ----

def test_folder_with_class_subfolders(tmp_path):
    source = open_images(_class_folder(tmp_path / "data"))
    images, labels = _all(source)
    assert len(source) == N and source.shape == (3, 8, 8)
    assert images.dtype == torch.float32 and images.shape == (N, 3, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    order = sorted(range(N), key=lambda i: ("a" if i % 2 == 0 else "b", i))  # sorted by path
    assert _index_of(images) == order
    assert torch.equal(images, torch.stack([_float(_pixels(i)) for i in order]))
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 2 for i in order]
    assert source.class_names == ["a", "b"]


def test_flat_folder_has_no_labels_and_reads_jpeg_and_grey(tmp_path):
    root = tmp_path / "flat"
    _png(root / "0.png", _pixels(0))
    Image.fromarray(_pixels(1)).save(root / "1.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    source = open_images(root)
    images, labels = _all(source)
    assert labels is None and images.shape == (2, 3, 8, 8)
    assert (images[1] - _float(_pixels(1))).abs().mean() < 0.1  # lossy, but the same picture
    grey = tmp_path / "grey"
    _png(grey / "g.png", _pixels(0)[:, :, :1])
    assert open_images(grey).shape == (1, 8, 8)
    assert open_images(root, shape=(1, 8, 8)).read([0])[0].shape == (1, 1, 8, 8)  # converted to grey


def test_folder_with_dataset_json_labels(tmp_path):
    root = tmp_path / "edm"
    for i in range(4):
        _png(root / "00000" / f"img{i:08d}.png", _pixels(i))
    entries = [[f"00000/img{i:08d}.png", 3 - i] for i in range(4)]
    (root / "dataset.json").write_text(json.dumps({"labels": entries}))
    _, labels = _all(open_images(root))
    assert labels.tolist() == [3, 2, 1, 0]
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    assert _all(open_images(root))[1] is None  # not read as class folders


def test_edm_zip_with_dataset_json(tmp_path):
    source = open_images(_edm_zip(tmp_path / "dataset.zip"))
    images, labels = _all(source)
    assert _index_of(images) == list(range(N))
    assert torch.equal(images, torch.stack([_float(_pixels(i)) for i in range(N)]))
    assert labels.tolist() == [i % 3 for i in range(N)]
    assert _all(open_images(_edm_zip(tmp_path / "unlabelled.zip", labels=False)))[1] is None


def test_npz_npy_and_torch_files(tmp_path):
    nhwc = np.stack([_pixels(i) for i in range(N)])
    expected = torch.stack([_float(_pixels(i)) for i in range(N)])
    labels = np.arange(N) % 4
    np.savez(tmp_path / "a.npz", images=nhwc, labels=labels)
    np.savez(tmp_path / "b.npz", expected.numpy())  # one unnamed float NCHW array
    np.save(tmp_path / "c.npy", nhwc)
    torch.save({"images": expected, "labels": torch.as_tensor(labels)}, tmp_path / "d.pt")
    torch.save(torch.from_numpy(nhwc), tmp_path / "e.pth")
    kinds = [("a.npz", True), ("b.npz", False), ("c.npy", False), ("d.pt", True), ("e.pth", False)]
    for name, has_labels in kinds:
        images, got = _all(open_images(tmp_path / name))
        assert images.dtype == torch.float32 and torch.allclose(images, expected, atol=1e-6), name
        assert (got.tolist() == labels.tolist()) if has_labels else got is None, name
    grey = np.stack([_pixels(i)[:, :, 0] for i in range(N)])  # (N, H, W)
    assert open_images(grey).shape == (1, 8, 8)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return N

    def __getitem__(self, i):
        if self.kind == "tensor":
            return _float(_pixels(i)), i % 5
        if self.kind == "pil":
            return Image.fromarray(_pixels(i))
        return _pixels(i), torch.tensor(i % 5)


@pytest.mark.parametrize("kind", ["tensor", "pil", "array"])
def test_torch_dataset(kind):
    source = open_images(_Pairs(kind))
    images, labels = _all(source)
    assert torch.allclose(images, torch.stack([_float(_pixels(i)) for i in range(N)]), atol=1e-6)
    assert labels is None if kind == "pil" else labels.tolist() == [i % 5 for i in range(N)]


def test_folder_is_read_lazily(tmp_path, monkeypatch):
    calls = []
    original = FileSource._load
    monkeypatch.setattr(FileSource, "_load", lambda self, i: calls.append(i) or original(self, i))
    source = open_images(_class_folder(tmp_path / "data"))
    assert calls == [0]  # the first image, for the shape
    source.read([3, 4])
    assert calls == [0, 3, 4]


# ---- the stream ----

def _stream(world: int, batch: int, steps: int, seed: int = 0, data=None):
    """Per step, the ranks' batches laid end to end (the global stream), as dataset indices."""
    data = data if data is not None else np.stack([_pixels(i) for i in range(N)])
    ranks = [RealData(data, batch, rank=r, world=world, seed=seed) for r in range(world)]
    out = []
    for _ in range(steps):
        for loader in ranks:
            out += _index_of(next(loader)[0])
    return out


@pytest.mark.parametrize("world,batch", [(2, 3), (3, 2), (3, 4)])
def test_ranks_share_each_epoch_disjointly_and_cover_it(world, batch):
    steps = 4 * N  # whole epochs: 4 N steps of world * batch images
    stream = _stream(world, batch, steps)
    epochs = [stream[e * N:(e + 1) * N] for e in range(len(stream) // N)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    # The same global stream whatever the split over ranks.
    assert stream == _stream(1, world * batch, steps)
    assert _stream(world, batch, steps, seed=1) != stream


def test_rank_batches_are_disjoint_within_an_epoch():
    data = np.stack([_pixels(i) for i in range(12)])
    ranks = [RealData(data, 2, rank=r, world=3, seed=5) for r in range(3)]
    seen = [sum((_index_of(next(loader)[0]) for _ in range(2)), []) for loader in ranks]  # one epoch
    assert sorted(sum(seen, [])) == list(range(12))
    assert all(not set(a) & set(b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_shuffle_off_reads_in_order():
    data = np.stack([_pixels(i) for i in range(N)])
    loader = RealData(data, 4, shuffle=False)
    assert [_index_of(next(loader)[0]) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


@pytest.mark.parametrize("world", [1, 3])
def test_resume_continues_bitwise(tmp_path, world):
    root = _class_folder(tmp_path / "data")
    steps = 9
    stop = 4

    def run(ranks, count):
        return [[next(loader) for _ in range(count)] for loader in ranks]

    fresh = [RealData(root, 3, rank=r, world=world, seed=11) for r in range(world)]
    whole = run(fresh, steps)
    first = [RealData(root, 3, rank=r, world=world, seed=11) for r in range(world)]
    run(first, stop)
    state = json.loads(json.dumps(first[0].state_dict()))  # rank 0's position serves every rank
    assert all(loader.state_dict() == state for loader in first)
    resumed = [RealData(root, 3, rank=r, world=world, seed=0) for r in range(world)]
    for loader in resumed:
        loader.load_state_dict(state)
    rest = run(resumed, steps - stop)
    for r in range(world):
        for (a_img, a_lab), (b_img, b_lab) in zip(whole[r][stop:], rest[r]):
            assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert resumed[0].state_dict() == fresh[0].state_dict()


def test_num_classes_checks_labels(tmp_path):
    root = _class_folder(tmp_path / "data")
    images, labels = next(RealData(root, 4, num_classes=2))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    with pytest.raises(DataError, match="label 1 but only 1 classes"):
        RealData(root, 4, num_classes=1)
    with pytest.raises(DataError, match="--data has no labels, but 10 classes"):
        RealData(np.stack([_pixels(i) for i in range(N)]), 4, num_classes=10)
    with pytest.raises(DataError, match="label 4 but only 3 classes"):
        next(RealData(_Pairs("tensor"), N, num_classes=3))


# ---- errors ----

def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="--data '.*nowhere' does not exist"):
        open_images(tmp_path / "nowhere")
    (tmp_path / "images.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type \.txt"):
        open_images(tmp_path / "images.txt")
    with pytest.raises(DataError, match="must be a path, an image array or a torch Dataset"):
        open_images(42)


def test_empty_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        open_images(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    with pytest.raises(DataError, match="holds no images"):
        open_images(tmp_path / "empty.zip")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        open_images(tmp_path / "empty.npz")

    class Empty(torch.utils.data.Dataset):
        def __len__(self):
            return 0

    with pytest.raises(DataError, match="is empty"):
        open_images(Empty())


def test_unreadable_files(tmp_path):
    root = _class_folder(tmp_path / "data", n=3)
    (root / "b" / "99.png").write_bytes(b"not a png at all")
    source = open_images(root)
    with pytest.raises(DataError, match="--data image 'b/99.png' .* cannot be read as an image"):
        source.read([len(source) - 1])
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(DataError, match="is not a readable zip file"):
        open_images(tmp_path / "bad.zip")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot be read as \.npz"):
        open_images(tmp_path / "bad.npz")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot be read as \.pt"):
        open_images(tmp_path / "bad.pt")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json is not a JSON object"):
        open_images(root)


def test_mixed_and_unexpected_shapes(tmp_path):
    root = tmp_path / "mixed"
    _png(root / "0.png", _pixels(0))
    _png(root / "1.png", _pixels(1, w=6))
    source = open_images(root)
    with pytest.raises(DataError, match=r"'1.png' .* is 3x8x6, expected 3x8x8"):
        source.read([0, 1])
    with pytest.raises(DataError, match=r"--data images are 3x8x8 \(C x H x W\) but 3x16x16 is expected"):
        open_images(_class_folder(tmp_path / "data"), shape=(3, 16, 16))
    with pytest.raises(DataError, match="3x8x8 .* but 1x8x8 is expected"):
        open_images(np.stack([_pixels(i) for i in range(N)]), shape=(1, 8, 8))

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return _float(_pixels(i, h=8 + i))

    with pytest.raises(DataError, match="--data item 1 is 3x9x8, expected 3x8x8"):
        open_images(Ragged()).read([0, 1])


def test_wrong_dtype_layout_and_range():
    nhwc = np.stack([_pixels(i) for i in range(N)])
    with pytest.raises(DataError, match=r"must lie in \[-1, 1\].*looks like 0..255"):
        open_images(torch.from_numpy(nhwc).permute(0, 3, 1, 2).float())
    with pytest.raises(DataError, match=r"must lie in \[-1, 1\], found values in \[-2"):
        open_images(torch.full((2, 3, 4, 4), -2.0))
    with pytest.raises(DataError, match="NaN or infinity"):
        open_images(torch.full((2, 3, 4, 4), float("nan")))
    with pytest.raises(DataError, match="got torch.int64"):
        open_images(torch.zeros(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(DataError, match="looks channels-first"):
        open_images(nhwc.transpose(0, 3, 1, 2).copy())
    with pytest.raises(DataError, match="looks channels-last"):
        open_images(torch.zeros(2, 8, 8, 3))
    with pytest.raises(DataError, match="float images must be \\(N, C, H, W\\)"):
        open_images(torch.zeros(8, 8, 3))


def test_label_errors(tmp_path):
    nhwc = np.stack([_pixels(i) for i in range(N)])
    np.savez(tmp_path / "short.npz", images=nhwc, labels=np.arange(N - 1))
    with pytest.raises(DataError, match=f"{N - 1} labels for {N} images"):
        open_images(tmp_path / "short.npz")
    np.savez(tmp_path / "onehot.npz", images=nhwc, labels=np.eye(N, dtype=np.int64))
    with pytest.raises(DataError, match="one-hot"):
        open_images(tmp_path / "onehot.npz")
    np.savez(tmp_path / "float.npz", images=nhwc, labels=np.zeros(N))
    with pytest.raises(DataError, match="integer class indices"):
        open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "two.npz", x=nhwc, y=nhwc)
    with pytest.raises(DataError, match="no array named 'images' among"):
        open_images(tmp_path / "two.npz")

    root = tmp_path / "edm"
    for i in range(3):
        _png(root / f"{i}.png", _pixels(i))
    (root / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 1]]}))
    with pytest.raises(DataError, match="2 labels for 3 images; first image without a label: '2.png'"):
        open_images(root)
    (root / "dataset.json").write_text(json.dumps({"labels": [["0.png", 0], ["1.png", 1], ["2.png", "cat"]]}))
    with pytest.raises(DataError, match="label of '2.png': labels must be class indices"):
        open_images(root)

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return (_float(_pixels(i)), 0) if i == 0 else _float(_pixels(i))

    with pytest.raises(DataError, match="item 1 lacks a label but item 0 has one"):
        open_images(Mixed()).read([0, 1])


def test_bad_stream_arguments_and_positions(tmp_path):
    data = np.stack([_pixels(i) for i in range(N)])
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        RealData(data, 0)
    with pytest.raises(ValueError, match="rank must be below world"):
        RealData(data, 2, rank=2, world=2)
    loader = RealData(data, 2)
    with pytest.raises(DataError, match="is for 5 images but --data holds 10"):
        loader.load_state_dict({"epoch": 0, "index": 0, "seed": 0, "shuffle": True, "size": 5})
    with pytest.raises(DataError, match="must be a dict with keys"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="out of range"):
        loader.load_state_dict({"epoch": 0, "index": 10, "seed": 0, "shuffle": True, "size": 10})

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(DataError, match="IterableDataset cannot be sharded"):
        open_images(Stream())


def test_docs_example_runs(tmp_path, monkeypatch):
    page = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "docs/data.md", "exec"), scope)
    assert scope["images"].shape == (4, 3, 8, 8) and scope["labels"].dtype == torch.int64
    assert scope["augment_labels"].shape == (4, 9)


def test_corrupt_image_in_a_folder_names_the_file(tmp_path):
    """A truncated PNG (its header intact) and a file that is no image at all, met while streaming: a DataError
    naming the file and what to do, not PIL's message about a BytesIO object."""
    root = _class_folder(tmp_path / "data", n=3)
    good = (root / "a" / "02.png").read_bytes()
    (root / "a" / "02.png").write_bytes(good[:len(good) // 2])
    (root / "b" / "01.png").write_bytes(b"not a png at all")
    stream = RealData(root, batch=len(open_images(root)), shuffle=False)
    with pytest.raises(DataError, match=r"--data image 'a/02.png' in .* cannot be read as an image: .*; fix or "
                                        r"remove the file"):
        next(stream)
    with pytest.raises(DataError, match=r"--data image 'b/01.png' in .* not a recognised image format \(a "
                                        r"corrupt or truncated file\?\); fix or remove the file") as info:
        open_images(root).read([2])
    assert "BytesIO" not in str(info.value)


def test_float_images_in_unit_range_warn_once(tmp_path):
    """Float data whose first batch lies in [0, 1]: one DataWarning naming --data and [-1, 1]; uint8 data and
    float data in [-1, 1] none."""
    import warnings

    from sidfast.training.data import DataWarning

    images = torch.rand(8, 3, 4, 4)
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    for data in (images, Items(), images.numpy()):
        stream = RealData(data, 4)
        with pytest.warns(DataWarning, match=r"--data: .* looks like \[0, 1\], but float images must be in "
                                             r"\[-1, 1\]"):
            next(stream)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            next(stream)  # once
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        next(RealData(images * 2 - 1, 4))
        next(RealData((images * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), 4))


def test_next_labels_advances_like_next_without_decoding(tmp_path):
    """next_labels: the labels next() would give, the stream advanced the same way (images not read where the
    labels are known up front)."""
    root = _class_folder(tmp_path / "data", n=3)
    a, b = RealData(root, 2, seed=3), RealData(root, 2, seed=3)
    calls = []
    read = b.source.read
    b.source.read = lambda indices: calls.append(indices) or read(indices)
    for _ in range(5):
        assert torch.equal(next(a)[1], b.next_labels())
    assert a.state_dict() == b.state_dict() and not calls
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    unlabelled = RealData(images, 4)
    assert unlabelled.next_labels() is None and unlabelled.state_dict()["index"] == 4
    dataset = RealData(torch.utils.data.TensorDataset(images, torch.arange(6)), 4, shuffle=False)
    assert dataset.next_labels().tolist() == [0, 1, 2, 3]
