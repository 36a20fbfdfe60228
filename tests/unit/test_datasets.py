"""Offline datasets: digits split, Fashion-MNIST sources and cache, missing-data errors."""

from __future__ import annotations

import collections
import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_dfkd.data import DATASETS, DatasetSplits, dataset_info, dataset_names, load_dataset
from fed_dfkd.errors import DatasetNotFoundError, UserError
from fed_dfkd.registry import UnknownNameError

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# platform.md §8.2: the decompressed Debian files are byte-identical to upstream.
UPSTREAM_FASHION_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.fixture(autouse=True)
def isolated_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the real Debian folder or the user's cache unless it asks to."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setenv("FED_DFKD_DEBIAN_DATASETS", str(empty))
    monkeypatch.setenv("FED_DFKD_CACHE", str(tmp_path / "default-cache"))


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (uint8), the number of dims, big-endian uint32 sizes, data."""
    sizes = b"".join(struct.pack(">I", size) for size in array.shape)
    header = bytes([0, 0, 0x08, array.ndim]) + sizes
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_fashion_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(12, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 3, 3, 1], dtype=np.uint8),
    }


def assert_matches_fake(splits: DatasetSplits, arrays: dict[str, np.ndarray]) -> None:
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        expected = torch.from_numpy(images).to(torch.float32).div(255).unsqueeze(1)
        assert torch.equal(getattr(splits, f"{split}_images"), expected)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        assert torch.equal(getattr(splits, f"{split}_labels"), labels)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Registry and info
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_dataset_and_rejects_unknown_names() -> None:
    assert dataset_names() == [
        "cifar10", "cifar100", "digits", "fashion_mnist", "kmnist", "mnist", "svhn"
    ]
    assert list(DATASETS) == dataset_names()
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'; valid: cifar10"):
        load_dataset("imagenet")


@pytest.mark.parametrize(
    ("name", "classes", "channels", "size", "mean", "std"),
    [
        ("digits", 10, 1, 8, (0.3053,), (0.3760,)),
        ("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
        ("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
        ("kmnist", 10, 1, 28, (0.1918,), (0.3483,)),
        ("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        ("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
        ("svhn", 10, 3, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_dataset_info_without_loading(
    name: str, classes: int, channels: int, size: int, mean: tuple, std: tuple
) -> None:
    info = dataset_info(name)
    described = (info.name, info.num_classes, info.in_channels, info.image_size)
    assert described == (name, classes, channels, size)
    assert (info.mean, info.std) == (mean, std)
    assert len(info.class_names) == len(set(info.class_names)) == classes


def test_errors_are_user_errors() -> None:
    assert issubclass(DatasetNotFoundError, UserError)
    assert issubclass(UserError, Exception) and not issubclass(UserError, KeyError)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_split_sizes_shapes_and_range() -> None:
    splits = load_dataset("digits", seed=0)
    assert splits.train_images.shape == (1437, 1, 8, 8)
    assert splits.test_images.shape == (360, 1, 8, 8)
    assert splits.train_images.dtype == torch.float32 and splits.train_labels.dtype == torch.int64
    both = torch.cat([splits.train_images, splits.test_images])
    assert both.min() == 0.0 and both.max() == 1.0
    assert torch.equal(both * 16, (both * 16).round())  # 17 grey levels, 0..16
    assert splits.source == "sklearn digits (embedded)"
    assert splits.info is dataset_info("digits")


def test_digits_split_is_a_partition_of_the_embedded_set() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    splits = load_dataset("digits", seed=3)

    def rows(images: torch.Tensor, labels: torch.Tensor) -> collections.Counter:
        pixels = (images * 16).round().to(torch.uint8).reshape(len(labels), -1).numpy()
        return collections.Counter(p.tobytes() + bytes([int(y)]) for p, y in zip(pixels, labels))

    train = rows(splits.train_images, splits.train_labels)
    union = train + rows(splits.test_images, splits.test_labels)
    full = rows(torch.from_numpy(bunch.images / 16.0), torch.from_numpy(bunch.target))
    assert union == full


def test_digits_split_is_stratified() -> None:
    splits = load_dataset("digits", seed=1)
    train_counts = torch.bincount(splits.train_labels, minlength=10)
    test_counts = torch.bincount(splits.test_labels, minlength=10)
    totals = train_counts + test_counts
    quota = totals.double() * 360 / 1797
    assert torch.all((test_counts.double() - quota).abs() < 1)


def test_digits_is_deterministic_per_seed() -> None:
    first, again, other = (load_dataset("digits", seed=s) for s in (7, 7, 8))
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.test_images, other.test_images)


def test_digits_test_fraction() -> None:
    splits = load_dataset("digits", test_fraction=0.5)
    assert (len(splits.train_labels), len(splits.test_labels)) == (898, 899)  # ceil(898.5) = 899
    with pytest.raises(UserError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


def test_digits_normalisation_constants_describe_the_whole_set() -> None:
    from sklearn.datasets import load_digits

    pixels = load_digits().images / 16.0
    info = dataset_info("digits")
    assert abs(pixels.mean() - info.mean[0]) < 5e-5
    assert abs(pixels.std() - info.std[0]) < 5e-5


def test_subsets_are_stratified_deterministic_and_independent() -> None:
    full = load_dataset("digits", seed=2)
    small = load_dataset("digits", seed=2, train_subset=500, test_subset=100)
    assert (len(small.train_labels), len(small.test_labels)) == (500, 100)
    quota = torch.bincount(full.train_labels, minlength=10).double() * 500 / 1437
    assert torch.all((torch.bincount(small.train_labels, minlength=10).double() - quota).abs() < 1)

    # Every kept image is one of the full split's images, with its label.
    def rows(splits: DatasetSplits) -> list[tuple[bytes, int]]:
        pairs = zip(splits.train_images, splits.train_labels)
        return [(image.numpy().tobytes(), int(label)) for image, label in pairs]

    full_rows = set(rows(full))
    assert all(row in full_rows for row in rows(small))

    again = load_dataset("digits", seed=2, train_subset=500, test_subset=50)
    assert torch.equal(small.train_images, again.train_images)  # test_subset has its own stream
    other = load_dataset("digits", seed=4, train_subset=500)
    assert not torch.equal(small.train_images, other.train_images)


@pytest.mark.parametrize(
    ("knob", "value"), [("train_subset", 2000), ("test_subset", 361), ("train_subset", 0)]
)
def test_bad_subset_sizes_are_user_errors(knob: str, value: int) -> None:
    with pytest.raises(UserError):
        load_dataset("digits", **{knob: value})


def test_splits_reject_tensors_of_the_wrong_shape() -> None:
    info = dataset_info("digits")
    good = torch.zeros(4, 1, 8, 8)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="train_images"):
        DatasetSplits(info, torch.zeros(4, 1, 28, 28), labels, good, labels, "test")
    with pytest.raises(ValueError, match="test_labels"):
        DatasetSplits(info, good, labels, good, labels[:3], "test")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def write_fake_debian(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    package = folder / "fashion-mnist"
    package.mkdir(parents=True)
    for name, array in arrays.items():
        (package / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return package


def test_fashion_mnist_from_root_in_torchvision_layout(tmp_path: Path) -> None:
    arrays = fake_fashion_arrays()
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        (raw / name).write_bytes(idx_bytes(array))
    splits = load_dataset("fashion_mnist", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert_matches_fake(splits, arrays)
    assert splits.source == f"torchvision FashionMNIST at {tmp_path / 'data'}"
    assert not (tmp_path / "cache").exists()  # root given: the Debian route is never taken


def test_fashion_mnist_from_debian_folder_is_decompressed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = fake_fashion_arrays(seed=1)
    write_fake_debian(tmp_path / "debian", arrays)
    monkeypatch.setenv("FED_DFKD_DEBIAN_DATASETS", str(tmp_path / "debian"))
    splits = load_dataset("fashion_mnist")  # cache_dir from FED_DFKD_CACHE
    assert_matches_fake(splits, arrays)
    raw = tmp_path / "default-cache" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)  # no temporary files left
    for name, array in arrays.items():
        assert (raw / name).read_bytes() == idx_bytes(array)
    assert "Debian dataset-fashion-mnist" in splits.source
    assert str(tmp_path / "default-cache") in splits.source

    # The cache is trusted once written: a changed cached label shows up, nothing is rewritten.
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[0] = 4
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    assert load_dataset("fashion_mnist").test_labels[0] == 4


def test_fashion_mnist_missing_root_shows_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    message = str(caught.value)
    assert "'fashion_mnist'" in message and str(tmp_path / "nowhere") in message
    assert "ROOT/FashionMNIST/raw/" in message and "t10k-labels-idx1-ubyte" in message


def test_fashion_mnist_without_any_source_names_both_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion_mnist", cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message and "ROOT/FashionMNIST/raw/" in message
    assert str(tmp_path / "no-debian" / "fashion-mnist") in message


@pytest.fixture(scope="module")
def debian_fashion(tmp_path_factory: pytest.TempPathFactory):
    if not DEBIAN_FASHION_DIR.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_DIR} absent: apt-get install dataset-fashion-mnist")
    cache = tmp_path_factory.mktemp("fashion-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FED_DFKD_DEBIAN_DATASETS", raising=False)
        first = load_dataset("fashion_mnist", cache_dir=cache)
        raw = cache / "FashionMNIST" / "raw"
        mtimes = {name: (raw / name).stat().st_mtime_ns for name in IDX_FILES}
        second = load_dataset("fashion_mnist", cache_dir=cache, train_subset=1000, test_subset=200)
    return first, second, raw, mtimes


def test_debian_fashion_mnist_full_splits(debian_fashion) -> None:
    first, _, _, _ = debian_fashion
    assert first.train_images.shape == (60000, 1, 28, 28)
    assert first.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(first.train_labels).tolist() == [6000] * 10
    assert torch.bincount(first.test_labels).tolist() == [1000] * 10
    assert first.train_images.min() == 0.0 and first.train_images.max() == 1.0
    assert "Debian dataset-fashion-mnist" in first.source
    info = first.info
    assert abs(first.train_images.mean().item() - info.mean[0]) < 5e-4
    assert abs(first.train_images.std().item() - info.std[0]) < 5e-4


def test_debian_fashion_mnist_cache_matches_upstream_and_is_reused(debian_fashion) -> None:
    first, second, raw, mtimes = debian_fashion
    for name, digest in UPSTREAM_FASHION_MD5.items():
        assert md5(raw / name) == digest, name
    assert {name: (raw / name).stat().st_mtime_ns for name in IDX_FILES} == mtimes
    assert (len(second.train_labels), len(second.test_labels)) == (1000, 200)
    assert torch.bincount(second.train_labels).tolist() == [100] * 10


# --------------------------------------------------------------------------------------------
# torchvision-only datasets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("mnist", "ROOT/MNIST/raw/"),
        ("kmnist", "ROOT/KMNIST/raw/"),
        ("cifar10", "ROOT/cifar-10-batches-py/"),
        ("cifar100", "ROOT/cifar-100-python/{train, test, meta}"),
        ("svhn", "ROOT/{train_32x32.mat, test_32x32.mat}"),
    ],
)
def test_missing_torchvision_dataset_names_dataset_root_and_layout(
    tmp_path: Path, name: str, layout: str
) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(name, root=tmp_path)
    message = str(caught.value)
    assert f"{name!r}" in message and str(tmp_path) in message and layout in message

    with pytest.raises(DatasetNotFoundError, match="--data-root") as caught:
        load_dataset(name)
    assert layout in str(caught.value)


def write_fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels}, handle)
        split = "test" if name == "test_batch" else "train"
        written[f"{split}_x"].append(data)
        written[f"{split}_y"].extend(labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(dataset_info("cifar10").class_names)}, handle)
    return {
        "train_x": np.concatenate(written["train_x"]).reshape(-1, 3, 32, 32),
        "train_y": np.array(written["train_y"]),
        "test_x": np.concatenate(written["test_x"]).reshape(-1, 3, 32, 32),
        "test_y": np.array(written["test_y"]),
    }


def test_cifar10_with_wrong_checksums_is_rejected(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="failed torchvision's check.*md5"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_pixels_come_out_channels_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import datasets as tv_datasets

    class UncheckedCIFAR10(tv_datasets.CIFAR10):  # md5 None: existence only (platform.md §8.4)
        train_list = [[name, None] for name, _ in tv_datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in tv_datasets.CIFAR10.test_list]
        meta = {**tv_datasets.CIFAR10.meta, "md5": None}

    monkeypatch.setattr(tv_datasets, "CIFAR10", UncheckedCIFAR10)
    written = write_fake_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=tmp_path)
    assert splits.train_images.shape == (20, 3, 32, 32)
    assert splits.test_images.shape == (4, 3, 32, 32)
    assert torch.equal(splits.train_images, torch.from_numpy(written["train_x"]).float() / 255)
    assert torch.equal(splits.test_images, torch.from_numpy(written["test_x"]).float() / 255)
    assert splits.train_labels.tolist() == written["train_y"].tolist()
    assert splits.source == f"torchvision CIFAR10 at {tmp_path}"
