"""Load a dataset's training split as uint8 arrays, and turn images into model inputs.

Only the training split is read: the authors partition it over the clients and never use
the official test split (docs/concepts/data.md). Sources:

- torchvision names: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``emnist``
  (split "byclass", 62 classes; images as torchvision stores them, i.e. transposed, as in
  the authors' code);
- ``imagefolder:<dir>``: ``<dir>/train/<class>/...`` images, classes in sorted folder order;
- ``tinyimagenet:<dir>``: Tiny-ImageNet's ``<dir>/train/<wnid>/images/*.JPEG``, kept at 64x64;
- ``npz:<file>``: Keras layout, ``x_train`` (n, H, W[, C]) uint8 and ``y_train``.

Folder sources are decoded once and cached as an ``.npz`` (50,000 JPEGs take seconds to
decode, the cache a fraction of a second to read). Results are memoised per process and
their arrays are read-only, because every caller in the process shares them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common.files import atomic_file

TORCHVISION_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "mnist", "fashion_mnist", "emnist")
SOURCE_FORMS = (
    f"{', '.join(TORCHVISION_NAMES)}, imagefolder:<dir>, tinyimagenet:<dir> or npz:<file>"
)
DEFAULT_CACHE_DIR = Path("~/.cache/mh-pfedhn")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GRAYSCALE_MODES = frozenset({"1", "L", "LA"})
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning

# Per-channel mean / std (docs/concepts/data.md).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "emnist": ((0.5,), (0.5,)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


class DatasetUnavailableError(RuntimeError):
    """The data cannot be found or fetched; the message says how to point at a local copy."""


@dataclass(frozen=True)
class RawDataset:
    """A training split: ``images`` uint8 (n, H, W, C), ``labels`` int64 (n,), both read-only."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str


def canonical_name(name: str) -> str:
    """Dataset name used for normalisation and partition defaults: lower case, '-' -> '_'."""
    return name.strip().lower().replace("-", "_")


def load_dataset(
    source: str,
    *,
    root: str | Path = "data",
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> RawDataset:
    """Load the training split named by ``source`` (see the module docstring for the forms).

    ``root`` is torchvision's data folder; ``cache_dir`` (default ``~/.cache/mh-pfedhn``)
    holds decoded image folders. Raises DatasetUnavailableError when the data is absent.
    """
    kind, location = _parse_source(source)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser().resolve()
    if kind in TORCHVISION_NAMES:
        return _load_memo(kind, str(Path(root).expanduser().resolve()), download, "")
    return _load_memo(kind, str(_existing(location, "data.source")), False, str(cache))


def _parse_source(source: str) -> tuple[str, str]:
    """(kind, location): a torchvision name with no location, or a path-based form."""
    kind, sep, location = source.strip().partition(":")
    kind = canonical_name(kind)
    if not sep and kind in TORCHVISION_NAMES:
        return kind, ""
    if sep and location and kind in ("imagefolder", "tinyimagenet", "npz"):
        return kind, location
    raise ValueError(f"unknown data source {source!r}; valid forms: {SOURCE_FORMS}")


def _existing(location: str, setting: str) -> Path:
    """The path, resolved; a relative one that is not there says where it was looked for."""
    path = Path(location).expanduser()
    if not path.is_absolute() and not path.exists():
        raise DatasetUnavailableError(
            f"{setting} path {location!r} is relative and does not exist from this process's "
            f"working directory {Path.cwd()}. In a deployment the ClientApp runs in its "
            "SuperNode's working directory, not where `flwr run` was started: give an "
            "absolute path (in the run config, or in the site's node config data-source)"
        )
    return path.resolve()


def source_fingerprint(source: str, root: str | Path = "data") -> str:
    """What identifies the bytes a source reads: its resolved path, size and modification
    time (a replaced file gives another fingerprint, so caches built from it are not used)."""
    kind, location = _parse_source(source)
    path = Path(root if kind in TORCHVISION_NAMES else location).expanduser().resolve()
    try:
        stat = path.stat()
        return f"{kind}:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        return f"{kind}:{path}:missing"


def clear_memo() -> None:
    """Forget datasets loaded in this process (the on-disk cache is kept)."""
    _load_memo.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_memo(kind: str, path: str, download: bool, cache_dir: str) -> RawDataset:
    if kind in TORCHVISION_NAMES:
        images, labels, num_classes = _load_torchvision(kind, Path(path), download)
        name = kind
    elif kind == "npz":
        images, labels, num_classes = _load_npz(Path(path))
        name = canonical_name(Path(path).stem)
    else:
        images, labels, num_classes = _load_folder(Path(path), Path(cache_dir), kind)
        name = "tinyimagenet" if kind == "tinyimagenet" else canonical_name(Path(path).name)
    images.setflags(write=False)
    labels.setflags(write=False)
    return RawDataset(images, labels, num_classes, name)


def _unavailable_message(what: str, where: Path, reason: str) -> str:
    return (
        f"dataset {what!r} is not available: {reason} (searched {where}). This machine may "
        "have no internet access, so downloads can fail. To use local data instead, set "
        "data.root to a folder holding torchvision's files for it, or use "
        "data.source: imagefolder:/path/to/cifar10 (a folder with train/<class>/ images) "
        "or data.source: npz:/path/to/mnist.npz (Keras layout: x_train, y_train)."
    )


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, int]:
    import torchvision.datasets as tvd

    factories = {
        "cifar10": lambda: tvd.CIFAR10(root, train=True, download=download),
        "cifar100": lambda: tvd.CIFAR100(root, train=True, download=download),
        "mnist": lambda: tvd.MNIST(root, train=True, download=download),
        "fashion_mnist": lambda: tvd.FashionMNIST(root, train=True, download=download),
        "emnist": lambda: tvd.EMNIST(root, split="byclass", train=True, download=download),
    }
    try:
        ds = factories[name]()
    except (RuntimeError, OSError) as exc:  # missing/corrupt files, or a failed download
        reason = f"download={download}, torchvision said: {exc}"
        raise DatasetUnavailableError(_unavailable_message(name, root, reason)) from exc
    images = np.asarray(ds.data, dtype=np.uint8)
    if images.ndim == 3:  # grayscale (n, H, W)
        images = images[..., None]
    labels = np.asarray(ds.targets, dtype=np.int64)
    return np.ascontiguousarray(images), labels, len(ds.classes)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    if not path.is_file():
        raise DatasetUnavailableError(_unavailable_message(path.stem, path, "no such npz file"))
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x_train", "y_train"} - set(npz.files)
        if missing:
            raise ValueError(
                f"{path} lacks {sorted(missing)} (has {npz.files}); expected the Keras layout "
                "x_train (n, H, W[, C]) uint8 and y_train (n,)"
            )
        images, labels = npz["x_train"], npz["y_train"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: x_train must be uint8 of shape (n, H, W) or (n, H, W, C), "
            f"got {images.dtype} {images.shape}"
        )
    if images.ndim == 3:
        images = images[..., None]
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels, int(labels.max()) + 1 if len(labels) else 0


def _list_folder(train_dir: Path) -> tuple[list[str], np.ndarray, int, str]:
    """Image files under each class folder (recursively, sorted), their labels, class count,
    and a fingerprint of the listing (file count, newest mtime, relative names)."""
    class_names = sorted(
        d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_names:
        raise ValueError(f"{train_dir} has no class folders")
    files: list[str] = []
    counts: list[int] = []
    max_mtime = 0
    for class_name in class_names:
        found = []
        for dirpath, dirnames, filenames in os.walk(train_dir / class_name):
            dirnames.sort()
            for fname in sorted(filenames):
                if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS and fname[0] != ".":
                    path = os.path.join(dirpath, fname)
                    max_mtime = max(max_mtime, os.stat(path).st_mtime_ns)
                    found.append(path)
        if not found:
            raise ValueError(f"class folder {train_dir / class_name} holds no images")
        files += found
        counts.append(len(found))
    labels = np.repeat(np.arange(len(class_names), dtype=np.int64), counts)
    prefix = len(str(train_dir)) + 1
    digest = hashlib.sha256(f"{len(files)}|{max_mtime}|".encode())
    digest.update("\n".join(f[prefix:] for f in files).encode())
    return files, labels, len(class_names), digest.hexdigest()


def _load_folder(root: Path, cache_dir: Path, kind: str) -> tuple[np.ndarray, np.ndarray, int]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        layout = "train/<wnid>/images/*.JPEG" if kind == "tinyimagenet" else "train/<class>/*"
        raise DatasetUnavailableError(
            _unavailable_message(root.name, root, f"expected an image folder laid out as {layout}")
        )
    files, labels, num_classes, fingerprint = _list_folder(train_dir)
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{kind}|{root}|{fingerprint}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"{kind}-{canonical_name(root.name)}-{key}.npz"
    cached = _read_cache(cache_file, len(files))
    if cached is not None:
        return cached, labels, num_classes
    images = _decode(files, force_rgb=kind == "tinyimagenet", desc=f"decoding {train_dir}")
    _write_cache(cache_file, images)
    return images, labels, num_classes


def _read_cache(cache_file: Path, expected: int) -> np.ndarray | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            images = npz["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable dataset cache {cache_file}: {exc}", stacklevel=3)
        return None
    return images if len(images) == expected else None


def _write_cache(cache_file: Path, images: np.ndarray) -> None:
    """Write via a temporary file and os.replace, so readers never see a partial cache."""
    try:
        with atomic_file(cache_file) as f:
            np.savez(f, images=images)
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {cache_file}: {exc}", stacklevel=3)


def _decode(files: list[str], *, force_rgb: bool, desc: str) -> np.ndarray:
    """Decode all images to (n, H, W, C) uint8.

    Channel rule: if every image is grayscale (PIL modes 1, L, LA) the result has C=1;
    otherwise every image is converted to RGB (grayscale replicated into 3 channels, as
    PIL's L->RGB does). Tiny-ImageNet is always RGB. All images must share one size.
    """
    images: np.ndarray | None = None
    all_gray = not force_rgb
    bar = tqdm(files, desc=desc, unit="img", disable=None)  # no bar on a log file or pipe
    if bar.disable:  # one line instead, so a log still says what the wait is
        print(f"{desc}: {len(files)} images (once: a cache serves later runs)", file=sys.stderr)
    for i, path in enumerate(bar):
        with Image.open(path) as img:
            gray = img.mode in _GRAYSCALE_MODES
            pixels = np.asarray(img.convert("L" if gray else "RGB"))
        if images is None:
            images = np.empty((len(files), *pixels.shape[:2], 3), dtype=np.uint8)
        if pixels.shape[:2] != images.shape[1:3]:
            raise ValueError(
                f"all images must have the same size: {path} is "
                f"{pixels.shape[1]}x{pixels.shape[0]}, {files[0]} is "
                f"{images.shape[2]}x{images.shape[1]}"
            )
        images[i] = pixels[..., None] if gray else pixels
        all_gray = all_gray and gray
    assert images is not None
    return np.ascontiguousarray(images[..., :1]) if all_gray else images


def channel_statistics(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) in [0, 1] units of uint8 (n, H, W, C) images, chunked.

    For datasets without known statistics, computed over the whole pool so that every
    client (and each client's train and test split) is normalised the same way.
    """
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())


def to_model_tensors(
    images: np.ndarray,
    *,
    normalize: str | tuple[tuple[float, ...], tuple[float, ...]] = "auto",
    dataset_name: str,
    image_size: int = 32,
) -> torch.Tensor:
    """uint8 (n, H, W, C) -> float32 (n, C, image_size, image_size), scaled and normalised.

    Resizing (bilinear, antialiased) matches the authors' Resize to 32x32 for 28x28 and
    64x64 inputs. ``normalize``: "auto" uses NORMALIZATION[dataset_name] or, for an unknown
    dataset, per-channel statistics of the given images (so pass the whole dataset, or
    explicit stats, when several clients must agree); "none" only scales to [0, 1]; a
    (mean, std) pair is used as given (one value, or one per channel).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images of shape (n, H, W, C), got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)).div_(255.0)
    if x.shape[-2:] != (image_size, image_size) and len(x):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    channels = x.shape[1]
    if normalize == "none":
        return x
    if normalize == "auto":
        stats = NORMALIZATION.get(canonical_name(dataset_name))
        if stats is None:
            mean = x.mean(dim=(0, 2, 3))
            std = x.std(dim=(0, 2, 3))
            std = torch.where(std > 0, std, torch.ones_like(std))
        else:
            mean, std = (torch.tensor(s, dtype=torch.float32) for s in stats)
            if len(mean) != channels:
                raise ValueError(
                    f"{dataset_name}'s normalisation has {len(mean)} channels but the images "
                    f"have {channels}; pass normalize='none' or explicit (mean, std)"
                )
    elif isinstance(normalize, str):
        raise ValueError(
            f"normalize must be 'auto', 'none' or a (mean, std) pair, got {normalize!r}"
        )
    else:
        mean, std = (torch.as_tensor(s, dtype=torch.float32).reshape(-1) for s in normalize)
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ValueError(
                f"normalize needs 1 or {channels} values per statistic, got {normalize!r}"
            )
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
