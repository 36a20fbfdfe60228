"""Offline image-classification datasets as whole tensors.

Every loader returns the complete train and test splits as ``float32 [N, C, H, W]`` tensors in
``[0, 1]``. They are **not** normalised: normalisation is a model-side
``Normalize(info.mean, info.std)`` layer, so real images and generator output (also in ``[0, 1]``)
pass through exactly the same transform.

Nothing is ever downloaded (platform.md §8). Sources:

* ``digits``: scikit-learn's embedded ``load_digits`` (8x8), with a seeded stratified split;
* ``fashion_mnist``: ``root`` in torchvision's layout if given, else the Debian package
  ``dataset-fashion-mnist`` (decompressed once into a cache in torchvision's layout);
* ``mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision's readers on ``root``
  with ``download=False``.

A missing source raises :class:`~fed_dfkd.errors.DatasetNotFoundError` whose message shows the
expected layout.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from fed_dfkd.errors import DatasetNotFoundError, UserError
from fed_dfkd.registry import Registry

__all__ = [
    "DatasetInfo",
    "DatasetSplits",
    "RawSplits",
    "DATASETS",
    "dataset_names",
    "dataset_info",
    "load_dataset",
    "default_cache_dir",
    "debian_datasets_dir",
    "DEBIAN_DATASETS_ENV",
    "CACHE_DIR_ENV",
]

logger = logging.getLogger(__name__)

#: Folder that holds Debian's ``fashion-mnist/`` (package ``dataset-fashion-mnist``).
DEBIAN_DATASETS_ENV = "FED_DFKD_DEBIAN_DATASETS"
_DEFAULT_DEBIAN_DATASETS_DIR = Path("/usr/share/datasets")
#: Where decompressed copies are kept; default ``~/.cache/fed-dfkd``.
CACHE_DIR_ENV = "FED_DFKD_CACHE"

# The four uncompressed IDX files torchvision's MNIST-family readers expect under <Folder>/raw/.
_IDX_FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, without loading it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass
class DatasetSplits:
    """Train and test splits as whole tensors.

    Images are ``float32 [N, C, H, W]`` in ``[0, 1]``, not normalised (see the module docstring);
    labels are ``int64 [N]``. ``source`` says in words where the data came from.
    """

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str

    def __post_init__(self) -> None:
        expected = (self.info.in_channels, self.info.image_size, self.info.image_size)
        for split in ("train", "test"):
            images: Tensor = getattr(self, f"{split}_images")
            labels: Tensor = getattr(self, f"{split}_labels")
            shape_ok = images.dim() == 4 and tuple(images.shape[1:]) == expected
            if images.dtype != torch.float32 or not shape_ok:
                raise ValueError(
                    f"{split}_images must be float32 [N, {', '.join(map(str, expected))}], "
                    f"got {images.dtype} {list(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{split}_labels must be int64 [{images.shape[0]}], "
                    f"got {labels.dtype} {list(labels.shape)}"
                )


@dataclass
class RawSplits:
    """What a registered loader returns: integer pixels before scaling and subsetting.

    Keeping pixels as integers (uint8 for all but digits) until after subsetting avoids building a
    float32 copy of a whole dataset only to keep a tenth of it.
    ``images / max_value`` gives ``[0, 1]``; images are ``[N, C, H, W]``.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    max_value: float
    source: str


#: A loader: ``(*, root, seed, test_fraction, cache_dir) -> RawSplits``.
DatasetLoader = Callable[..., RawSplits]

DATASETS: Registry[DatasetLoader] = Registry("dataset")
_INFOS: dict[str, DatasetInfo] = {}


def _register(info: DatasetInfo) -> Callable[[DatasetLoader], DatasetLoader]:
    def decorator(loader: DatasetLoader) -> DatasetLoader:
        DATASETS.register(info.name)(loader)
        _INFOS[info.name] = info
        return loader

    return decorator


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    """Shape, classes and normalisation of a dataset, without touching its files.

    Raises :class:`~fed_dfkd.registry.UnknownNameError` for an unknown name.
    """
    DATASETS.get(name)
    return _INFOS[name]


def default_cache_dir() -> Path:
    """``$FED_DFKD_CACHE`` if set, else ``~/.cache/fed-dfkd``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fed-dfkd"


def debian_datasets_dir() -> Path:
    """Folder holding Debian's ``fashion-mnist/``.

    ``$FED_DFKD_DEBIAN_DATASETS`` if set, else ``/usr/share/datasets``.
    """
    configured = os.environ.get(DEBIAN_DATASETS_ENV)
    return Path(configured).expanduser() if configured else _DEFAULT_DEBIAN_DATASETS_DIR


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    train_subset: int | None = None,
    test_subset: int | None = None,
    cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """Load a dataset's train and test splits as float32 tensors in ``[0, 1]``.

    Args:
        name: one of :func:`dataset_names`.
        root: a folder in torchvision's layout (the CLI's ``--data-root``); required for the
            torchvision-only datasets, optional for ``fashion_mnist``, ignored by ``digits``.
        seed: seeds the digits train/test split and the subsets; the same seed gives the same
            tensors.
        test_fraction: share of ``digits`` held out for testing; the other datasets have an
            official split and ignore it.
        train_subset, test_subset: keep this many images of each split, stratified by class
            (each class keeps its share within one image); ``None`` keeps everything.
        cache_dir: where decompressed copies are kept (Fashion-MNIST from Debian); default
            :func:`default_cache_dir`.
    """
    loader = DATASETS.get(name)
    info = _INFOS[name]
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction}")
    for knob, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        is_count = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and (not is_count or value < 1):
            raise UserError(f"{knob} must be a positive integer or None, got {value!r}")

    raw = loader(
        root=None if root is None else Path(root).expanduser(),
        seed=seed,
        test_fraction=test_fraction,
        cache_dir=default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser(),
    )
    train_images, train_labels = _subset(
        raw.train_images, raw.train_labels, train_subset,
        seed=seed, stream=1, what=f"{name} train split",
    )
    test_images, test_labels = _subset(
        raw.test_images, raw.test_labels, test_subset,
        seed=seed, stream=2, what=f"{name} test split",
    )
    splits = DatasetSplits(
        info=info,
        train_images=_to_unit_float(train_images, raw.max_value),
        train_labels=train_labels.to(torch.int64),
        test_images=_to_unit_float(test_images, raw.max_value),
        test_labels=test_labels.to(torch.int64),
        source=raw.source,
    )
    logger.info(
        "dataset %s: %d train / %d test images from %s",
        name, len(splits.train_labels), len(splits.test_labels), splits.source,
    )
    return splits


# --------------------------------------------------------------------------------------------
# Splitting and subsetting
# --------------------------------------------------------------------------------------------


def _stratified_choice(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``size`` items, each class keeping its share within one item.

    Per-class counts use the largest-remainder rule (floor of the exact quota, the leftover items
    to the classes with the largest fractional parts, ties broken at random).
    """
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * (size / counts.sum())
    take = np.floor(quotas).astype(np.int64)
    leftover = size - int(take.sum())
    order = np.lexsort((rng.random(len(classes)), -(quotas - take)))
    take[order[:leftover]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(k), replace=False)
        for cls, k in zip(classes, take)
    ]
    return np.sort(np.concatenate(chosen))


def _subset(
    images: Tensor, labels: Tensor, size: int | None, *, seed: int, stream: int, what: str
) -> tuple[Tensor, Tensor]:
    total = len(labels)
    if size is None or size == total:
        return images, labels
    if size > total:
        raise UserError(f"asked for a subset of {size} images but the {what} has only {total}")
    # Separate streams so that the train subset does not change when test_subset does.
    keep = _stratified_choice(labels.numpy(), size, np.random.default_rng([seed, stream]))
    index = torch.from_numpy(keep)
    return images[index], labels[index]


def _to_unit_float(images: Tensor, max_value: float) -> Tensor:
    return images.to(torch.float32).div_(max_value)


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# --------------------------------------------------------------------------------------------


@_register(
    DatasetInfo(
        name="digits",
        num_classes=10,
        in_channels=1,
        image_size=8,
        # Pixel mean and (population) standard deviation of all 1 797 images after dividing by
        # 16, computed once with numpy: 0.30526, 0.37605. Constants, so they do not depend on the
        # seeded split.
        mean=(0.3053,),
        std=(0.3760,),
        class_names=tuple(str(digit) for digit in range(10)),
    )
)
def _load_digits(
    *, root: Path | None, seed: int, test_fraction: float, cache_dir: Path
) -> RawSplits:
    from sklearn.datasets import load_digits

    if root is not None:
        logger.debug("digits is embedded in scikit-learn; ignoring root %s", root)
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    total = len(labels)
    # ceil, as scikit-learn's train_test_split does: 0.2 of 1797 gives 1437 / 360.
    test_size = min(max(math.ceil(total * test_fraction), 1), total - 1)
    test_index = _stratified_choice(labels.numpy(), test_size, np.random.default_rng([seed, 0]))
    is_test = np.zeros(total, dtype=bool)
    is_test[test_index] = True
    train_index = torch.from_numpy(np.flatnonzero(~is_test))
    test_index_t = torch.from_numpy(test_index)
    return RawSplits(
        train_images=images[train_index],
        train_labels=labels[train_index],
        test_images=images[test_index_t],
        test_labels=labels[test_index_t],
        max_value=16.0,
        source="sklearn digits (embedded)",
    )


# --------------------------------------------------------------------------------------------
# MNIST family (IDX files read by torchvision)
# --------------------------------------------------------------------------------------------


def _idx_layout(folder: str) -> str:
    files = ", ".join(_IDX_FILE_NAMES)
    return f"ROOT/{folder}/raw/{{{files}}}  (uncompressed IDX files; gunzip the original .gz files)"


def _read_idx_family(dataset_class: Any, root: Path, name: str, folder: str) -> tuple[Tensor, ...]:
    """Both splits of a torchvision MNIST-family dataset under ``root``, as uint8 [N, 1, H, W]."""
    raw_dir = root / folder / "raw"
    missing = [file for file in _IDX_FILE_NAMES if not (raw_dir / file).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found under root {root}: "
            f"missing {', '.join(missing)} in {raw_dir}.\n"
            f"Expected layout:\n  {_idx_layout(folder)}"
        )
    try:
        train = dataset_class(str(root), train=True, download=False)
        test = dataset_class(str(root), train=False, download=False)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        # torchvision's reader asserts on the IDX magic numbers: an empty message is the usual case.
        reason = f"{type(exc).__name__}: {exc}" if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"dataset {name!r}: cannot read the IDX files in {raw_dir} ({reason}); they are damaged "
            "or not uncompressed IDX files (gunzip the original .gz files)"
        ) from exc
    return (
        train.data.unsqueeze(1), train.targets.to(torch.int64),
        test.data.unsqueeze(1), test.targets.to(torch.int64),
    )


def _require_root(root: Path | None, name: str, layout: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} is not shipped with any package: it needs --data-root "
            f"(config data.root) pointing at a folder laid out as:\n  {layout}\n"
            "Nothing is downloaded."
        )
    return root


def _check_image_size(images: Tensor, name: str, size: int, where: Path) -> None:
    if tuple(images.shape[-2:]) != (size, size):
        raise UserError(
            f"dataset {name!r} in {where} has {tuple(images.shape[-2:])} images, "
            f"expected {size}x{size}"
        )


def _torchvision_idx_loader(name: str, folder: str) -> DatasetLoader:
    def load(*, root: Path | None, seed: int, test_fraction: float, cache_dir: Path) -> RawSplits:
        from torchvision import datasets as tv_datasets

        root = _require_root(root, name, _idx_layout(folder))
        dataset_class = getattr(tv_datasets, folder)
        train_x, train_y, test_x, test_y = _read_idx_family(dataset_class, root, name, folder)
        _check_image_size(train_x, name, 28, root)
        return RawSplits(train_x, train_y, test_x, test_y, 255.0, f"torchvision {folder} at {root}")

    return load


_register(
    DatasetInfo(
        name="mnist", num_classes=10, in_channels=1, image_size=28,
        mean=(0.1307,), std=(0.3081,),  # algorithms.md §8
        class_names=tuple(str(digit) for digit in range(10)),
    )
)(_torchvision_idx_loader("mnist", "MNIST"))

_register(
    DatasetInfo(
        name="kmnist", num_classes=10, in_channels=1, image_size=28,
        # Not recomputed here (no offline copy of KMNIST exists); these are the train-set values
        # commonly quoted for KMNIST.
        mean=(0.1918,), std=(0.3483,),
        class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    )
)(_torchvision_idx_loader("kmnist", "KMNIST"))


_FASHION_INFO = DatasetInfo(
    name="fashion_mnist", num_classes=10, in_channels=1, image_size=28,
    mean=(0.2860,), std=(0.3530,),  # train-set pixel statistics
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)


def _decompress_debian_fashion_mnist(package_dir: Path, cache_dir: Path) -> Path:
    """Gunzip Debian's four files into ``cache_dir/FashionMNIST/raw`` unless already there.

    Returns the torchvision root (``cache_dir``). Each file is written to a temporary name in the
    same folder and renamed, so an interrupted run never leaves a truncated file that a later run
    would trust.
    """
    raw_dir = cache_dir / "FashionMNIST" / "raw"
    pending = [file for file in _IDX_FILE_NAMES if not (raw_dir / file).is_file()]
    if not pending:
        return cache_dir
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for file in pending:
            handle, temporary = tempfile.mkstemp(dir=raw_dir, prefix=f".{file}.", suffix=".partial")
            try:
                with os.fdopen(handle, "wb") as target:
                    with gzip.open(package_dir / f"{file}.gz", "rb") as source:
                        shutil.copyfileobj(source, target, length=1 << 20)
                os.replace(temporary, raw_dir / file)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(
            f"cannot decompress Fashion-MNIST from {package_dir} into {raw_dir}: {exc}. "
            f"Set {CACHE_DIR_ENV} (or pass a cache dir) to a writable folder, or reinstall "
            "the package dataset-fashion-mnist."
        ) from exc
    logger.info("decompressed Fashion-MNIST from %s into %s", package_dir, raw_dir)
    return cache_dir


@_register(_FASHION_INFO)
def _load_fashion_mnist(
    *, root: Path | None, seed: int, test_fraction: float, cache_dir: Path
) -> RawSplits:
    from torchvision import datasets as tv_datasets

    if root is not None:
        train_x, train_y, test_x, test_y = _read_idx_family(
            tv_datasets.FashionMNIST, root, "fashion_mnist", "FashionMNIST"
        )
        source = f"torchvision FashionMNIST at {root}"
        where = root
    else:
        package_dir = debian_datasets_dir() / "fashion-mnist"
        missing = [file for file in _IDX_FILE_NAMES if not (package_dir / f"{file}.gz").is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"dataset 'fashion_mnist' not found: no --data-root given and {package_dir} lacks "
                f"{', '.join(f + '.gz' for f in missing)}.\nEither:\n"
                "  * install the Debian package: apt-get install dataset-fashion-mnist "
                f"(files in /usr/share/datasets/fashion-mnist; ${DEBIAN_DATASETS_ENV} points "
                "at another folder holding fashion-mnist/), or\n"
                f"  * pass --data-root ROOT laid out as:\n    {_idx_layout('FashionMNIST')}"
            )
        torchvision_root = _decompress_debian_fashion_mnist(package_dir, cache_dir)
        train_x, train_y, test_x, test_y = _read_idx_family(
            tv_datasets.FashionMNIST, torchvision_root, "fashion_mnist", "FashionMNIST"
        )
        source = f"Debian dataset-fashion-mnist ({package_dir}) via cache {torchvision_root}"
        where = package_dir
    _check_image_size(train_x, "fashion_mnist", 28, where)
    return RawSplits(train_x, train_y, test_x, test_y, 255.0, source)


# --------------------------------------------------------------------------------------------
# CIFAR and SVHN (torchvision, md5-checked files)
# --------------------------------------------------------------------------------------------

_CIFAR10_LAYOUT = (
    "ROOT/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch, batches.meta}"
)
_CIFAR100_LAYOUT = "ROOT/cifar-100-python/{train, test, meta}"
_SVHN_LAYOUT = "ROOT/{train_32x32.mat, test_32x32.mat}"
_CIFAR10_FILES = tuple(f"cifar-10-batches-py/{f}" for f in (
    *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"))
_CIFAR100_FILES = tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta"))
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _check_files(root: Path, files: tuple[str, ...], name: str, layout: str) -> None:
    missing = [file for file in files if not (root / file).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found under root {root}: missing {', '.join(missing)}.\n"
            f"Expected layout:\n  {layout}\nNothing is downloaded."
        )


def _corrupted(name: str, root: Path, layout: str, exc: Exception) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} under root {root} failed torchvision's check ({exc}): the files must be "
        f"the original ones (md5-checked), laid out as:\n  {layout}"
    )


def _cifar_loader(name: str, class_attr: str, files: tuple[str, ...], layout: str) -> DatasetLoader:
    def load(*, root: Path | None, seed: int, test_fraction: float, cache_dir: Path) -> RawSplits:
        from torchvision import datasets as tv_datasets

        root = _require_root(root, name, layout)
        _check_files(root, files, name, layout)
        dataset_class = getattr(tv_datasets, class_attr)
        try:
            train = dataset_class(str(root), train=True, download=False)
            test = dataset_class(str(root), train=False, download=False)
        except RuntimeError as exc:
            raise _corrupted(name, root, layout, exc) from exc

        def images(split: Any) -> Tensor:  # torchvision keeps CIFAR as uint8 [N, H, W, C]
            return torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)))

        def labels(split: Any) -> Tensor:
            return torch.as_tensor(np.asarray(split.targets, dtype=np.int64))

        train_x = images(train)
        _check_image_size(train_x, name, 32, root)
        source = f"torchvision {class_attr} at {root}"
        return RawSplits(train_x, labels(train), images(test), labels(test), 255.0, source)

    return load


_register(
    DatasetInfo(
        name="cifar10", num_classes=10, in_channels=3, image_size=32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),  # algorithms.md §8
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
    )
)(_cifar_loader("cifar10", "CIFAR10", _CIFAR10_FILES, _CIFAR10_LAYOUT))

_register(
    DatasetInfo(
        name="cifar100", num_classes=100, in_channels=3, image_size=32,
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),  # algorithms.md §8
        # Fine-label names in label order (alphabetical), as in the archive's meta file.
        class_names=(
            "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
            "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
            "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
            "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
            "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
            "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
            "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
            "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
            "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew",
            "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
            "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
            "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree",
            "wolf", "woman", "worm",
        ),
    )
)(_cifar_loader("cifar100", "CIFAR100", _CIFAR100_FILES, _CIFAR100_LAYOUT))


@_register(
    DatasetInfo(
        name="svhn", num_classes=10, in_channels=3, image_size=32,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # algorithms.md §8
        class_names=tuple(str(digit) for digit in range(10)),
    )
)
def _load_svhn(*, root: Path | None, seed: int, test_fraction: float, cache_dir: Path) -> RawSplits:
    from torchvision import datasets as tv_datasets

    root = _require_root(root, "svhn", _SVHN_LAYOUT)
    _check_files(root, _SVHN_FILES, "svhn", _SVHN_LAYOUT)
    try:
        # torchvision maps SVHN's label 10 to digit 0 and returns uint8 [N, C, H, W].
        train = tv_datasets.SVHN(str(root), split="train", download=False)
        test = tv_datasets.SVHN(str(root), split="test", download=False)
    except RuntimeError as exc:
        raise _corrupted("svhn", root, _SVHN_LAYOUT, exc) from exc
    train_x = torch.from_numpy(np.ascontiguousarray(train.data))
    _check_image_size(train_x, "svhn", 32, root)
    return RawSplits(
        train_x,
        torch.from_numpy(np.asarray(train.labels, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(test.data)),
        torch.from_numpy(np.asarray(test.labels, dtype=np.int64)),
        255.0,
        f"torchvision SVHN at {root}",
    )


def load_experiment_data(cfg: Any) -> DatasetSplits:
    """The dataset an experiment config names (``data.*``; split seeded by ``data.split_seed``)."""
    d = cfg.data
    return load_dataset(d.dataset, root=d.root, seed=d.split_seed, test_fraction=d.test_fraction,
                        train_subset=d.train_subset, test_subset=d.test_subset)
