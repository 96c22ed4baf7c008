"""Dataset loading (docs/concepts/data.md) on small generated data, plus one real offline file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import datasets as D

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture(autouse=True)
def _fresh_memo():
    D.clear_memo()
    yield
    D.clear_memo()


def _write_images(folder: Path, arrays: list[np.ndarray], ext: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / f"{i:04d}{ext}")


def _rgb(rng: np.random.Generator, n: int, size: int = 8) -> list[np.ndarray]:
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ----------------------------------------------------------------------------- npz
def test_npz_keras_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = np.arange(20, dtype=np.uint8) % 7
    np.savez(tmp_path / "My-Digits.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    raw = D.load_dataset(f"npz:{tmp_path / 'My-Digits.npz'}")
    assert raw.name == "my_digits"
    assert raw.images.shape == (20, 28, 28, 1) and raw.images.dtype == np.uint8
    assert np.array_equal(raw.images[..., 0], x)
    assert raw.labels.dtype == np.int64 and np.array_equal(raw.labels, y)
    assert raw.num_classes == 7
    assert not raw.images.flags.writeable  # shared through the memo
    assert D.load_dataset(f"npz:{tmp_path / 'My-Digits.npz'}") is raw


def test_npz_color_with_column_labels(tmp_path: Path) -> None:
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "fashion-mnist.npz", x_train=x, y_train=np.array([[0], [1], [2], [1]]))
    raw = D.load_dataset(f"npz:{tmp_path / 'fashion-mnist.npz'}")
    assert raw.name == "fashion_mnist"
    assert raw.images.shape == (4, 32, 32, 3) and raw.labels.tolist() == [0, 1, 2, 1]


def test_decoding_into_a_log_file_writes_one_line_not_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep's log is a file: a bar's carriage returns would garble it (and did)."""
    root = tmp_path / "Pets"
    _write_images(root / "train" / "cat", _rgb(np.random.default_rng(2), 3))
    D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        f"decoding {root / 'train'}: 3 images (once: a cache serves later runs)"
    ]


def test_npz_problems_are_reported(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetUnavailableError, match="missing.npz"):
        D.load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="x_train"):
        D.load_dataset(f"npz:{tmp_path / 'bad.npz'}")


# ----------------------------------------------------------------------------- image folders
def test_imagefolder_loads_and_reuses_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    cats, dogs = _rgb(rng, 3), _rgb(rng, 2)
    root = tmp_path / "Pets-Small"
    _write_images(root / "train" / "dog", dogs)
    _write_images(root / "train" / "cat", cats)
    _write_images(root / "test" / "cat", cats[:1])  # never read
    cache = tmp_path / "cache"

    raw = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert raw.name == "pets_small" and raw.num_classes == 2
    assert raw.images.shape == (5, 8, 8, 3)
    assert raw.labels.tolist() == [0, 0, 0, 1, 1]  # sorted class folders: cat, dog
    assert np.array_equal(raw.images, np.stack(cats + dogs))
    cache_files = list(cache.iterdir())
    assert len(cache_files) == 1 and cache_files[0].suffix == ".npz"

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    D.clear_memo()
    monkeypatch.setattr(D.Image, "open", no_decoding)
    again = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert np.array_equal(again.images, raw.images) and np.array_equal(again.labels, raw.labels)

    # A new file changes the fingerprint, so the folder is decoded again.
    monkeypatch.undo()
    _write_images(root / "train" / "emu", _rgb(rng, 1))
    D.clear_memo()
    grown = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert grown.images.shape[0] == 6 and grown.num_classes == 3
    assert not [p for p in cache.iterdir() if p.suffix != ".npz"]  # no temporary files left


def test_imagefolder_channel_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gray = [rng.integers(0, 256, (6, 6), dtype=np.uint8) for _ in range(2)]
    _write_images(tmp_path / "g" / "train" / "a", gray)
    raw = D.load_dataset(f"imagefolder:{tmp_path / 'g'}", cache_dir=tmp_path / "c")
    assert raw.images.shape == (2, 6, 6, 1) and np.array_equal(raw.images[..., 0], np.stack(gray))

    _write_images(tmp_path / "m" / "train" / "a", gray[:1])
    _write_images(tmp_path / "m" / "train" / "b", _rgb(rng, 1, size=6))
    mixed = D.load_dataset(f"imagefolder:{tmp_path / 'm'}", cache_dir=tmp_path / "c")
    assert mixed.images.shape == (2, 6, 6, 3)
    assert all(np.array_equal(mixed.images[0, ..., c], gray[0]) for c in range(3))


def test_imagefolder_rejects_mixed_sizes_and_missing_dirs(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _write_images(tmp_path / "d" / "train" / "a", _rgb(rng, 1, size=8))
    _write_images(tmp_path / "d" / "train" / "b", _rgb(rng, 1, size=9))
    with pytest.raises(ValueError, match=r"b/0000\.png"):
        D.load_dataset(f"imagefolder:{tmp_path / 'd'}", cache_dir=tmp_path / "c")
    with pytest.raises(D.DatasetUnavailableError, match="nowhere"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", cache_dir=tmp_path / "c")


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = tmp_path / "tiny-imagenet-200"
    for wnid, n in (("n02", 2), ("n01", 3)):
        _write_images(root / "train" / wnid / "images", _rgb(rng, n, size=64), ext=".JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("0 0 1 1\n")
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(
        root / "train" / "n02" / "images" / "g.JPEG"
    )
    raw = D.load_dataset(f"tinyimagenet:{root}", cache_dir=tmp_path / "c")
    assert raw.name == "tinyimagenet" and raw.num_classes == 2
    assert raw.images.shape == (6, 64, 64, 3)  # grayscale JPEG converted to RGB
    assert raw.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted wnids
    x = D.to_model_tensors(raw.images, dataset_name=raw.name)
    assert x.shape == (6, 3, 32, 32)


# ----------------------------------------------------------------------------- sources
def test_torchvision_offline_error_explains_alternatives(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetUnavailableError) as info:
        D.load_dataset("mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for part in ("mnist", str(tmp_path), "internet", "data.root", "imagefolder:", "npz:"):
        assert part in message


def test_unknown_source_lists_valid_forms() -> None:
    with pytest.raises(ValueError, match="imagefolder:<dir>"):
        D.load_dataset("svhn")
    with pytest.raises(ValueError, match="npz:<file>"):
        D.load_dataset("folder:/tmp")


# ----------------------------------------------------------------------------- tensors
def test_to_model_tensors_resizes_and_normalises_mnist() -> None:
    images = np.full((3, 28, 28, 1), 200, dtype=np.uint8)
    x = D.to_model_tensors(images, dataset_name="mnist")
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    expected = (200 / 255 - 0.1307) / 0.3081
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5)
    raw01 = D.to_model_tensors(images, dataset_name="mnist", normalize="none")
    assert torch.allclose(raw01, torch.full_like(raw01, 200 / 255), atol=1e-6)


def test_to_model_tensors_color_stats_and_explicit_pair() -> None:
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[..., 1] = 255
    x = D.to_model_tensors(images, dataset_name="cifar10")
    mean, std = D.NORMALIZATION["cifar10"]
    for c, v in enumerate((0.0, 1.0, 0.0)):
        assert torch.allclose(x[:, c], torch.full_like(x[:, c], (v - mean[c]) / std[c]), atol=1e-5)
    y = D.to_model_tensors(images, dataset_name="anything", normalize=((0.5,), (0.25,)))
    assert torch.allclose(y[:, 1], torch.full_like(y[:, 1], 2.0))


def test_to_model_tensors_auto_stats_for_unknown_dataset() -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    x = D.to_model_tensors(images, dataset_name="my_folder")
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_to_model_tensors_rejects_channel_mismatch_and_bad_input() -> None:
    with pytest.raises(ValueError, match="channels"):
        D.to_model_tensors(np.zeros((1, 32, 32, 3), np.uint8), dataset_name="mnist")
    with pytest.raises(ValueError, match="uint8"):
        D.to_model_tensors(np.zeros((1, 32, 32), np.float32), dataset_name="mnist")
    with pytest.raises(ValueError, match="normalize"):
        D.to_model_tensors(
            np.zeros((1, 8, 8, 1), np.uint8), dataset_name="mnist", normalize="zscore"
        )


def test_normalization_table_matches_spec() -> None:
    assert set(D.NORMALIZATION) == {
        "cifar10",
        "cifar100",
        "mnist",
        "fashion_mnist",
        "emnist",
        "tinyimagenet",
    }
    assert D.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert D.NORMALIZATION["fashion_mnist"] == ((0.2860,), (0.3530,))


# ----------------------------------------------------------------------------- real data
@pytest.mark.skipif(
    not SHARED_MNIST.is_file(), reason=f"offline MNIST copy not found at {SHARED_MNIST}"
)
def test_real_mnist_npz() -> None:
    raw = D.load_dataset(f"npz:{SHARED_MNIST}")
    assert raw.name == "mnist" and raw.num_classes == 10
    assert raw.images.shape == (60000, 28, 28, 1)
    assert raw.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_channel_statistics_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
    mean, std = D.channel_statistics(images, chunk=7)
    x = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-6)


def _partitions(tiny_npz, cache, limit_gb):
    """Both clients' data of a 2-client split of the tiny set, through the partition cache."""
    from client_app.data import _cached_on_disk
    from common.config import DataConfig

    data = DataConfig(source=f"npz:{tiny_npz}", num_clients=2, partitioner="iid",
                      cache_dir=str(cache), cache_max_gb=limit_gb)  # fmt: skip
    _cached_on_disk.cache_clear()  # the process's memo would hide the disk
    return [_cached_on_disk(data.model_dump_json(), i, 2, 0) for i in (0, 1)]


def test_the_partition_cache_keeps_what_was_used_last_within_its_limit(tiny_npz, tmp_path):
    """It grew to 13 GB over a week of sweeps here and filled the disk: now it is bounded."""
    import os
    import time

    from client_app.data import evict_least_recent

    cache = tmp_path / "c"
    first = _partitions(tiny_npz, cache, 0)
    entries = sorted((cache / "partitions").glob("*.pt"))
    assert len(entries) == 2
    old = time.time() - 100
    for entry in entries:
        os.utime(entry, (old, old))
    again = _partitions(tiny_npz, cache, 0)  # read back (a hit renews the entry's time)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(first, again, strict=True))
    assert all(e.stat().st_mtime > old + 50 for e in entries)
    oldest, newest = entries
    os.utime(oldest, (old, old))
    size = newest.stat().st_size
    assert evict_least_recent(cache / "partitions", size + 1, keep=newest) == [oldest]
    assert evict_least_recent(cache / "partitions", 1, keep=newest) == []  # never the one kept
    assert evict_least_recent(cache / "partitions", 0, keep=newest) == []  # 0: no limit
    assert (cache / "partitions" / newest.name).is_file()


def test_the_cache_size_keys_nothing_and_a_full_disk_costs_only_the_cache(
    tiny_npz, tmp_path, monkeypatch, caplog
):
    from client_app import data as client_data

    cache = tmp_path / "c"
    _partitions(tiny_npz, cache, 10)
    names = sorted(p.name for p in (cache / "partitions").iterdir())
    _partitions(tiny_npz, cache, 5)
    assert sorted(p.name for p in (cache / "partitions").iterdir()) == names  # same entries

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client_data.torch, "save", full)
    with caplog.at_level("WARNING", logger="flwr.mh_pfedhn"):
        loaded = _partitions(tiny_npz, tmp_path / "other", 10)
    assert len(loaded) == 2 and len(loaded[0].y_train) > 0
    assert "was not written (" in caplog.text and "No space left" in caplog.text
    assert list((tmp_path / "other" / "partitions").iterdir()) == []  # no temporary file left
