"""Real images for SiDA: the data sets users already have (``open_images``) and a resumable stream of
them shared among the ranks (``RealData``). Inputs, labels, layouts and the stream: ``docs/data.md``.

Errors are ``DataError`` (a ValueError) naming ``--data``; float images that look like [0, 1] rather than
[-1, 1] get a ``DataWarning``.
"""
from __future__ import annotations

import abc
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from sidfast._checks import check_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npz", ".npy", ".pt", ".pth")
LABELS_FILE = "dataset.json"


class DataError(ValueError):
    """Bad ``--data``: the message says which input and what is wrong with it."""


class DataWarning(UserWarning):
    """``--data`` that is accepted but looks wrong (float images in [0, 1], labels an unconditional teacher
    ignores)."""


# ---- conversions to float32 (C, H, W) in [-1, 1] ----

def _from_uint8_hwc(a: torch.Tensor, what: str, shape: tuple | None = None) -> torch.Tensor:
    """uint8 (..., H, W, C) channels-last -> float32 (..., C, H, W) in [-1, 1], contiguous (a channels-last
    view would make anything that draws in memory order, dropout or randn_like, draw differently);
    ``shape``: the shape an error reports (the whole array's, when ``a`` is a slice of it)."""
    if a.shape[-1] not in (1, 3):
        channels_first = a.dim() >= 3 and a.shape[-3] in (1, 3)
        hint = " (it looks channels-first; uint8 images are read channels-last)" if channels_first else ""
        raise DataError(f"{what}: uint8 images must be (H, W, C) with 1 or 3 channels, got shape "
                        f"{tuple(shape or a.shape)}{hint}")
    return a.movedim(-1, -3).contiguous().to(torch.float32) / 127.5 - 1


def _check_float(a: torch.Tensor, what: str) -> torch.Tensor:
    """A float tensor (..., C, H, W) whose values lie in [-1, 1], as float32."""
    if a.shape[-3] not in (1, 3):
        channels_last = a.shape[-1] in (1, 3)
        hint = " (it looks channels-last; float images are read channels-first)" if channels_last else ""
        raise DataError(f"{what}: float images must be (C, H, W) with 1 or 3 channels, got shape "
                        f"{tuple(a.shape)}{hint}")
    if not torch.isfinite(a).all():
        raise DataError(f"{what}: images contain NaN or infinity")
    lo = a.min().item()
    hi = a.max().item()
    if lo < -1 or hi > 1:
        hint = " (it looks like 0..255: store uint8 instead)" if hi > 2 else ""
        raise DataError(f"{what}: float images must lie in [-1, 1], found values in [{lo:g}, {hi:g}]{hint}")
    return a.to(torch.float32)


def _to_image(item, what: str, channels: int | None) -> torch.Tensor:
    """One image of any accepted kind -> float32 (C, H, W) in [-1, 1]."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return _decode(item, what, channels)
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor):
        raise DataError(f"{what}: expected an image (PIL image, array or tensor), got {type(item).__name__}")
    if item.dtype == torch.uint8:
        if item.dim() not in (2, 3):
            raise DataError(f"{what}: a uint8 image must be (H, W, C) or (H, W), got shape "
                            f"{tuple(item.shape)}")
        return _from_uint8_hwc(item if item.dim() == 3 else item.unsqueeze(-1), what)
    if item.is_floating_point():
        if item.dim() != 3:
            raise DataError(f"{what}: a float image must be (C, H, W), got shape {tuple(item.shape)}")
        return _check_float(item, what)
    raise DataError(f"{what}: images must be uint8 (0..255) or float in [-1, 1], got {item.dtype}")


def _decode(image, what: str, channels: int | None) -> torch.Tensor:
    """A PIL image -> float32 (C, H, W); grey stays one channel unless ``channels`` asks for three."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DataError(f"{what}: {image.mode} images (16-bit or float) are not supported; "
                        f"save them as 8-bit")
    if channels is None:
        channels = 1 if image.mode in ("1", "L") else 3
    pixels = np.array(image.convert("L" if channels == 1 else "RGB"))
    return _from_uint8_hwc(torch.from_numpy(pixels).view(*pixels.shape[:2], channels), what)


def _label(value, what: str) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.ndarray, np.generic)):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{what}: labels must be class indices (integers >= 0), got {value!r}")
    return value


# ---- sources: len(source), source.read(indices) -> (images (B, C, H, W), labels (B,) or None) ----

class ImageSource(abc.ABC):
    """Indexable images with optional labels. ``shape`` is (C, H, W) of the first image, which every
    image read must match; ``has_labels`` says whether items carry labels; ``labels`` holds them all as
    int64 when they are known without decoding (files with labels, arrays), else None."""

    shape: tuple
    has_labels: bool
    labels: torch.Tensor | None = None
    float_input: bool = False  # images given as floats (a range of [0, 1] instead of [-1, 1] is possible)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images float32 (B, C, H, W) in [-1, 1] and labels int64 (B,) or None, for dataset indices."""


class ArraySource(ImageSource):
    """A whole array in memory: uint8 (N, H, W, C) / (N, H, W) or float (N, C, H, W) in [-1, 1]."""

    def __init__(self, images, labels=None, what: str = "--data"):
        images = _as_tensor(images, f"{what} images")
        if images.dtype == torch.uint8:
            if images.dim() not in (3, 4):
                raise DataError(f"{what}: uint8 images must be (N, H, W, C) or (N, H, W), got shape "
                                f"{tuple(images.shape)}")
            images = images if images.dim() == 4 else images.unsqueeze(-1)
            _from_uint8_hwc(images[:1], what, tuple(images.shape))  # checks the layout
        elif images.is_floating_point():
            if images.dim() != 4:
                raise DataError(f"{what}: float images must be (N, C, H, W), got shape {tuple(images.shape)}")
            images = _check_float(images, what)
        else:
            raise DataError(f"{what}: images must be uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1], "
                            f"got {images.dtype}")
        self._images = images
        self.float_input = images.is_floating_point()
        if len(images) == 0:
            raise DataError(f"{what} holds no images")
        self.shape = tuple(images.shape[1:]) if images.is_floating_point() else (
            images.shape[3], images.shape[1], images.shape[2])
        self.labels = None if labels is None else _label_array(labels, len(images), what)
        self.has_labels = self.labels is not None

    def __len__(self) -> int:
        return len(self._images)

    def read(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self._images[index]
        images = batch if batch.is_floating_point() else _from_uint8_hwc(batch, "--data")
        return images, None if self.labels is None else self.labels[index]


def _as_tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{what}: an object array is not an image array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    raise DataError(f"{what}: expected an array or tensor, got {type(value).__name__}")


def _label_array(labels, count: int, what: str) -> torch.Tensor:
    if isinstance(labels, (list, tuple)):
        try:
            labels = torch.tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{what}: labels must be a list of class indices") from None
    labels = _as_tensor(labels, f"{what} labels")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"{what}: labels must be integer class indices, got {labels.dtype}")
    if labels.dim() != 1:
        hint = " (one-hot labels: store labels.argmax(1))" if labels.dim() == 2 else ""
        raise DataError(f"{what}: labels must have shape (N,), got {tuple(labels.shape)}{hint}")
    if len(labels) != count:
        raise DataError(f"{what}: {len(labels)} labels for {count} images")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{what}: labels must be class indices >= 0, found {labels.min().item()}")
    return labels.to(torch.int64)


class FileSource(ImageSource):
    """Image files in a folder or a zip, decoded one at a time when read."""

    class_names: list[str] | None = None  # the class subfolders, when they give the labels

    def __init__(self, path: Path, channels: int | None = None):
        self.path = path
        self._zip = None
        self._zip_pid = None
        self.names = self._list()
        if not self.names:
            raise DataError(f"--data {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.labels = self._read_labels()
        self.has_labels = self.labels is not None
        self._channels = channels
        first = self._load(0)
        self._channels = first.shape[0]
        self.shape = tuple(first.shape)

    @property
    def is_zip(self) -> bool:
        return self.path.is_file()

    def _list(self) -> list[str]:
        if self.is_zip:
            names = self._archive().namelist()
        else:
            names = []
            for root, dirs, files in os.walk(self.path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = Path(root).relative_to(self.path)
                names += [(rel / f).as_posix() for f in files if not f.startswith(".")]
        return sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.endswith("/")
                      and not any(part.startswith(".") or part == "__MACOSX" for part in n.split("/")))

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker opens its own handle
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"--data {str(self.path)!r} is not a readable zip file: {exc}") from None
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_zip_pid": None}

    def _bytes(self, name: str) -> bytes | None:
        if self.is_zip:
            zf = self._archive()
            return zf.read(name) if name in zf.NameToInfo else None
        file = self.path / name
        return file.read_bytes() if file.is_file() else None

    def _read_labels(self) -> torch.Tensor | None:
        where = f"--data {str(self.path)!r}"
        raw = self._bytes(LABELS_FILE)
        if raw is None:
            return self._folder_labels()
        try:
            entries = json.loads(raw).get("labels")
        except (ValueError, AttributeError) as exc:
            raise DataError(f"{where}: {LABELS_FILE} is not a JSON object with a 'labels' entry "
                            f"({exc})") from None
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 for e in entries):
            raise DataError(f"{where}: {LABELS_FILE} 'labels' must be a list of [filename, label] pairs")
        table = {str(name).replace("\\", "/"): label for name, label in entries}
        missing = [n for n in self.names if n not in table]
        if missing or len(table) != len(self.names):
            first = f"; first image without a label: {missing[0]!r}" if missing else ""
            raise DataError(f"{where}: {LABELS_FILE} has {len(table)} labels for {len(self.names)} "
                            f"images{first}")
        return torch.tensor([_label(table[n], f"{where}: {LABELS_FILE} label of {n!r}") for n in self.names],
                            dtype=torch.int64)

    def _folder_labels(self) -> torch.Tensor | None:
        parts = [n.split("/") for n in self.names]
        if not all(len(p) == 2 for p in parts):
            return None
        classes = sorted({p[0] for p in parts})
        self.class_names = classes
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        name = self.names[i]
        what = f"--data image {name!r} in {str(self.path)!r}"
        try:
            raw = self._bytes(name)
            with Image.open(io.BytesIO(raw)) as image:
                image.load()
                return _decode(image, what, self._channels)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, UnidentifiedImageError):
                reason = "not a recognised image format (a corrupt or truncated file?)"
            raise DataError(f"{what} cannot be read as an image: {reason}; fix or remove the file") from None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, indices):
        images = []
        for i in indices:
            image = self._load(i)
            if tuple(image.shape) != self.shape:
                raise DataError(f"--data image {self.names[i]!r} in {str(self.path)!r} is "
                                f"{_shape_text(image.shape)}, expected {_shape_text(self.shape)}")
            images.append(image)
        return torch.stack(images), None if self.labels is None else self.labels[torch.as_tensor(indices)]


class DatasetSource(ImageSource):
    """A map-style torch ``Dataset`` whose items are an image or (image, label)."""

    def __init__(self, dataset, channels: int | None = None):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise DataError("--data: an IterableDataset cannot be sharded or resumed; "
                            "pass a map-style Dataset")
        try:
            count = len(dataset)
        except TypeError:
            raise DataError(f"--data: a {type(dataset).__name__} needs __len__ to be sharded") from None
        if count == 0:
            raise DataError(f"--data: the {type(dataset).__name__} is empty")
        self.dataset = dataset
        self._count = count
        self._channels = channels
        first, label = self._item(0)
        self.has_labels = label is not None
        self.float_input = _is_float_image(self.dataset[0])
        self._channels = first.shape[0]
        self.shape = tuple(first.shape)

    def _item(self, i: int):
        item = self.dataset[i]
        what = f"--data item {i}"
        label = None
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise DataError(f"{what}: expected an image or (image, label), got a sequence of {len(item)}")
            item, label = item
            label = None if label is None else _label(label, what)
        return _to_image(item, what, self._channels), label

    def __len__(self) -> int:
        return self._count

    def read(self, indices):
        images = []
        labels = []
        for i in indices:
            image, label = self._item(i)
            if tuple(image.shape) != self.shape:
                raise DataError(f"--data item {i} is {_shape_text(image.shape)}, "
                                f"expected {_shape_text(self.shape)}")
            if (label is not None) != self.has_labels:
                raise DataError(f"--data item {i} {'lacks' if label is None else 'has'} a label but item 0 "
                                f"{'has one' if self.has_labels else 'does not'}")
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64) if self.has_labels else None


def _is_float_image(item) -> bool:
    """Whether a Dataset item (an image or (image, label)) holds its image as floats."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    return isinstance(image, (torch.Tensor, np.ndarray)) and (
        image.is_floating_point() if isinstance(image, torch.Tensor) else np.issubdtype(image.dtype, np.floating))


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ---- opening ----

def open_images(data, shape: tuple | None = None) -> ImageSource:
    """An ``ImageSource`` for a path (folder, zip, npz/npy, pt/pth), an array/tensor, or a torch Dataset.

    ``shape`` (C, H, W), when given, is what the consumer expects (a teacher's input): a dataset of
    another height or width is refused; decoded image files take its channel count."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with C = 1 or 3, got {shape}")
    channels = None if shape is None else shape[0]
    if isinstance(data, ImageSource):
        source = data
    elif isinstance(data, (str, os.PathLike)):
        source = _open_path(Path(data), channels)
    elif isinstance(data, (np.ndarray, torch.Tensor)):
        source = ArraySource(data)
    elif isinstance(data, torch.utils.data.Dataset):
        source = DatasetSource(data, channels)
    else:
        raise DataError(f"--data must be a path, an image array or a torch Dataset, "
                        f"got {type(data).__name__}")
    if shape is not None and source.shape != shape:
        raise DataError(f"--data images are {_shape_text(source.shape)} (C x H x W) but "
                        f"{_shape_text(shape)} is expected")
    return source


def _open_path(path: Path, channels: int | None) -> ImageSource:
    where = f"--data {str(path)!r}"
    if not path.exists():
        raise DataError(f"{where} does not exist")
    if not os.access(path, os.R_OK):
        raise DataError(f"{where} is not readable (check its permissions)")
    if path.is_dir():
        return FileSource(path, channels)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return FileSource(path, channels)
    if suffix not in ARRAY_SUFFIXES:
        raise DataError(f"{where}: unsupported file type {suffix or '(none)'}; expected a folder, .zip, "
                        f"{', '.join(ARRAY_SUFFIXES)}")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as loaded:
                arrays = dict(loaded)
        elif suffix == ".npy":
            arrays = {"images": np.load(path, allow_pickle=False)}
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            arrays = loaded if isinstance(loaded, dict) else {"images": loaded}
    except Exception as exc:  # numpy and torch raise many types (ValueError, OSError, UnpicklingError, ...)
        raise DataError(f"{where} cannot be read as {suffix}: {exc}") from None
    if "images" in arrays:
        images = arrays["images"]
    elif len(arrays) == 1 or (len(arrays) == 2 and "labels" in arrays):
        images = next(v for k, v in arrays.items() if k != "labels")
    else:
        raise DataError(f"{where}: no array named 'images' among {sorted(arrays)}")
    return ArraySource(images, arrays.get("labels"), what=where)


# ---- the stream ----

class RealData:
    """Infinite per-rank batches ``(images float32 (B, C, H, W), labels int64 (B,) or None)``.

    ``seed`` must be the same on every rank (the run's seed, not a per-rank one). ``num_classes``, when
    given, requires labels below it (a class-conditional teacher's label count)."""

    def __init__(self, data, batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, shape: tuple | None = None, num_classes: int | None = None):
        bounds = (("batch", batch, 1), ("world", world, 1), ("rank", rank, 0), ("seed", seed, 0))
        for name, value, low in bounds:
            check_int(name, value, low)
        if rank >= world:
            raise ValueError(f"rank must be below world ({world}), got {rank}")
        self.source = open_images(data, shape)
        self.batch = batch
        self.rank = rank
        self.world = world
        self.seed = seed
        self.shuffle = shuffle
        self.num_classes = num_classes
        if num_classes is not None:
            if not self.source.has_labels:
                raise DataError(f"--data has no labels, but {num_classes} classes are expected (a "
                                f"class-conditional teacher): use class subfolders, dataset.json or "
                                f"a labels array")
            if self.source.labels is not None:
                _check_classes(self.source.labels, num_classes, "--data")
        self.epoch = 0
        self.index = 0
        self._order = None  # (epoch, permutation) of the last epoch used
        self._range_checked = False  # float images: their range looked at once, on the first batch

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self.source.read(self._batch_indices())
        if labels is not None and self.num_classes is not None:
            _check_classes(labels, self.num_classes, "--data")
        if self.source.float_input and not self._range_checked:
            self._range_checked = True
            _warn_if_unit_range(images)
        self._advance(self.world * self.batch)
        return images.contiguous(), labels

    def next_labels(self) -> torch.Tensor | None:
        """The labels of the next batch (None without labels), advancing the stream as ``next`` does but
        without decoding images where the labels are known up front (SiDA's generator step takes the labels
        of a fresh real batch, as published)."""
        indices = self._batch_indices()
        if not self.source.has_labels:
            labels = None
        elif self.source.labels is not None:
            labels = self.source.labels[torch.as_tensor(indices)]
        else:
            labels = self.source.read(indices)[1]
        if labels is not None and self.num_classes is not None:
            _check_classes(labels, self.num_classes, "--data")
        self._advance(self.world * self.batch)
        return labels

    def _batch_indices(self) -> list[int]:
        start = self.rank * self.batch
        return [self._at(start + k) for k in range(self.batch)]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.source)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def _at(self, offset: int) -> int:
        """The dataset index ``offset`` entries after the current position."""
        n = len(self.source)
        epoch = self.epoch + (self.index + offset) // n
        return int(self._permutation(epoch)[(self.index + offset) % n])

    def _advance(self, count: int) -> None:
        n = len(self.source)
        self.epoch += (self.index + count) // n
        self.index = (self.index + count) % n

    def state_dict(self) -> dict:
        """The stream position, identical on every rank: plain ints, JSON-serializable."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "size": len(self.source)}

    def load_state_dict(self, state: dict) -> None:
        keys = {"epoch", "index", "seed", "shuffle", "size"}
        if not isinstance(state, dict) or set(state) != keys:
            raise DataError(f"the saved data position must be a dict with keys {sorted(keys)}, got "
                            f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if state["size"] != len(self.source):
            raise DataError(f"the saved data position is for {state['size']} images but --data holds "
                            f"{len(self.source)}: resume with the same --data")
        if not 0 <= state["index"] < state["size"] or state["epoch"] < 0:
            raise DataError(f"the saved data position is out of range: epoch {state['epoch']}, "
                            f"index {state['index']}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self._order = None


def _warn_if_unit_range(images: torch.Tensor) -> None:
    """Warn when float images look like [0, 1] (min >= 0 and max <= 1) rather than [-1, 1]."""
    lo = images.min().item()
    hi = images.max().item()
    if lo >= 0 and hi <= 1:
        warnings.warn(f"--data: the float images of the first batch lie in [{lo:g}, {hi:g}], which looks like "
                      f"[0, 1], but float images must be in [-1, 1] (EDM's convention): store images * 2 - 1, "
                      f"or uint8 0..255", DataWarning, stacklevel=3)


def _check_classes(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if len(labels) and labels.max().item() >= num_classes:
        raise DataError(f"{what} has label {labels.max().item()} but only {num_classes} classes are expected")
