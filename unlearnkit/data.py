"""Datasets as whole tensors, and the forget / retain / test splits of the course.

Every image of a dataset (its training pool first, then its test pool) sits in one uint8
tensor on the compute device, indexed by one *global* index. A :class:`Split` is four index
tensors into that one space, so "is this forget index really a test image?" is a question the
code can answer, and training never goes through a per-sample DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DIR = REPO_ROOT / "data" / "embedded"

#: Names accepted by :func:`load_dataset`, with the files torchvision needs for each.
_REQUIRED_FILES = {
    "mnist": ("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "fashion-mnist": ("FashionMNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "cifar10": ("cifar-10-batches-py", ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                        "data_batch_4", "data_batch_5", "test_batch")),
}
_REQUIRED_FILES["embedded"] = _REQUIRED_FILES["fashion-mnist"]
DATASETS = tuple(_REQUIRED_FILES)


def data_root() -> Path:
    """Folder where downloaded datasets are cached: ``$UNLEARNKIT_DATA`` or the repo's ``data/``."""
    return Path(os.environ.get("UNLEARNKIT_DATA", REPO_ROOT / "data")).expanduser()


class DatasetNotFoundError(FileNotFoundError):
    """A dataset was asked for but its files are not on this machine."""


@dataclass
class ImageDataset:
    """A whole image-classification dataset as tensors on one device.

    Attributes:
        name: the dataset's name (``"embedded"``, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``).
        images: uint8 tensor ``[N, C, H, W]``: the training pool, then the test pool.
        labels: int64 tensor ``[N]``.
        n_train_pool: how many of the ``N`` images come from the official training set.
        classes: class names, index = label.
        mean, std: per-channel statistics of the training pool, in [0, 1] units; the models
            standardise with them.
    """

    name: str
    images: Tensor
    labels: Tensor
    n_train_pool: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def train_pool(self) -> Tensor:
        """Global indices of the official training images."""
        return torch.arange(self.n_train_pool, device=self.labels.device)

    @property
    def test_pool(self) -> Tensor:
        """Global indices of the official test images."""
        return torch.arange(self.n_train_pool, len(self.labels), device=self.labels.device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``data[idx]`` gives ``(images, labels)`` of those global indices."""
        return self.images[index], self.labels[index]

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with its tensors on ``device``."""
        return ImageDataset(self.name, self.images.to(device), self.labels.to(device), self.n_train_pool,
                            self.classes, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}: {self.n_train_pool} train + {len(self) - self.n_train_pool} test "
                f"images of {self.channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
                f"on {self.device})")


def _check_files(name: str, root: Path) -> None:
    folder, files = _REQUIRED_FILES[name]
    where = root / folder
    missing = [f for f in files if not (where / f).exists()]
    if not missing:
        return
    if name == "embedded":
        fix = ("The embedded subset ships with the repository: run from a clone of it (pip install -e .), "
               "or rebuild it with `python scripts/make_embedded_data.py` after "
               "`apt-get install dataset-fashion-mnist`.")
    else:
        fix = (f"Fix it one of two ways: (1) on a machine with internet, call "
               f"load_dataset({name!r}, download=True) once, which caches the files in {root}; or "
               f"(2) copy the files into {where} yourself, or set UNLEARNKIT_DATA to a folder that holds "
               f"{folder}/. Offline, dataset='embedded' always works.")
    raise DatasetNotFoundError(
        f"Dataset {name!r} is not available: missing {', '.join(missing)} in {where}. {fix}")


def _torchvision_arrays(name: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray, tuple[str, ...]]:
    from torchvision import datasets  # imported here: only dataset loading needs torchvision

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "embedded": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[name]
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=download)

    def as_nchw(images) -> np.ndarray:
        array = np.asarray(images, dtype=np.uint8)
        return array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)  # CIFAR is stored NHWC

    return (as_nchw(train.data), np.asarray(train.targets), as_nchw(test.data), np.asarray(test.targets),
            tuple(train.classes))


def load_dataset(name: str = "embedded", device: torch.device | str = "cpu", root: str | Path | None = None,
                 download: bool = False) -> ImageDataset:
    """Load a whole dataset through torchvision into tensors on ``device``.

    Args:
        name: ``"embedded"`` (the offline Fashion-MNIST subset that ships with the course:
            10,000 train / 2,000 test, balanced), ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
        device: where the tensors go; keep them on the GPU when there is one.
        root: folder holding the torchvision files; default :func:`data_root` (the embedded set
            always comes from the repository's ``data/embedded``).
        download: let torchvision download missing files (needs internet).

    Raises:
        ValueError: for an unknown name.
        DatasetNotFoundError: when the files are missing and ``download`` is off; the message
            lists the missing files, where they were looked for, and how to fix it.
    """
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar": "cifar10"}.get(key, key)
    if key not in _REQUIRED_FILES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    folder = EMBEDDED_DIR if key == "embedded" else Path(root) if root is not None else data_root()
    if not download or key == "embedded":
        _check_files(key, folder)

    x_train, y_train, x_test, y_test, classes = _torchvision_arrays(key, folder, download and key != "embedded")
    images = torch.from_numpy(np.concatenate([x_train, x_test]))
    labels = torch.from_numpy(np.concatenate([y_train, y_test]).astype(np.int64))
    pool = images[: len(x_train)].float().div_(255)
    mean = tuple(pool.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pool.std(dim=(0, 2, 3)).tolist())
    return ImageDataset(key, images.contiguous(), labels, len(x_train), classes, mean, std).to(device)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Who is forgotten, who is kept, who is held out: index tensors into one dataset.

    ``train = retain ∪ forget`` (disjoint) is what the original model was trained on; the retrain
    oracle sees ``retain`` only; ``test`` is never trained on. ``request`` is the latest forget
    request (equal to ``forget`` except in a sequence of requests, where ``forget`` accumulates).
    Build splits with :func:`make_split`, :func:`random_split`, :func:`class_split` or
    :func:`request_sequence`, which check their input.
    """

    forget: Tensor
    retain: Tensor
    test: Tensor
    request: Tensor
    description: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def train(self) -> Tensor:
        """All training indices: retain and forget, sorted."""
        return torch.cat([self.retain, self.forget]).sort().values

    def __repr__(self) -> str:
        return (f"Split({self.description or 'custom'}: forget={len(self.forget)}, retain={len(self.retain)}, "
                f"test={len(self.test)})")


#: What the kit accepts as indices: a tensor, a NumPy array or a sequence of ints.
Indices = Tensor | np.ndarray | Sequence[int]


def _as_index_tensor(indices: Indices, what: str) -> Tensor:
    tensor = torch.as_tensor(indices).detach().cpu()
    if tensor.dtype == torch.bool:
        raise ValueError(f"{what} must be integer indices, got a boolean mask; use mask.nonzero().flatten()")
    if tensor.is_floating_point() or tensor.dtype.is_complex:
        raise ValueError(f"{what} must be integer indices, got dtype {tensor.dtype}")
    return tensor.long().flatten()


def _subsample(pool: Tensor, n: int | None, generator: torch.Generator, what: str) -> Tensor:
    if n is None or n >= len(pool):
        if n is not None and n > len(pool):
            raise ValueError(f"{what}={n} asked for, but only {len(pool)} images are available")
        return pool.cpu()
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    return pool.cpu()[torch.randperm(len(pool), generator=generator)[:n]].sort().values


def _preview(values: Tensor) -> str:
    return f"{values[:5].tolist()}{' ...' if values.numel() > 5 else ''}"


def _duplicates(indices: Tensor) -> Tensor:
    values, counts = indices.unique(return_counts=True)
    return values[counts > 1]


def check_split(data: ImageDataset, split: Split) -> None:
    """Check that ``split`` fits ``data``: raise a ``ValueError`` saying what is wrong and how to fix it.

    Every unlearning method calls it first, so a hand-built :class:`Split` gets the same checks as one
    from :func:`make_split`: integer index tensors, in range, each index once, a non-empty forget set of
    training images, a non-empty retain set disjoint from it, a non-empty test set disjoint from both, and the
    latest ``request`` inside ``forget``.
    """
    if not isinstance(split, Split):
        raise TypeError(f"split must be an unlearnkit Split (from make_split, random_split or class_split), got "
                        f"{type(split).__name__}")
    parts = {name: _as_index_tensor(getattr(split, name), f"split.{name}")
             for name in ("forget", "retain", "test", "request")}
    forget, retain, test, request = parts.values()
    if forget.numel() == 0:
        raise ValueError("the forget set is empty: give at least one training index to forget")
    if retain.numel() == 0:
        raise ValueError("the retain set is empty: the forget set covers the whole training set, so nothing "
                         "would be left to retain (retraining on nothing is not unlearning, it is deleting the model)")
    if test.numel() == 0:
        raise ValueError("the test set is empty: every comparison with the oracle and every membership attack needs "
                         "held-out images; leave test=None to use the dataset's test pool")
    n = len(data)
    for name, indices in parts.items():
        bad = indices[(indices < 0) | (indices >= n)]
        if bad.numel():
            raise ValueError(f"{name} indices out of range [0, {n}): {_preview(bad)}")
        repeated = _duplicates(indices)
        if repeated.numel():
            raise ValueError(f"duplicate {name} indices: {_preview(repeated)}; give each index once")
    if torch.isin(forget, retain).any():
        raise ValueError(f"indices {_preview(forget[torch.isin(forget, retain)])} are both forgotten and retained; "
                         "retain must be the training set without the forget set")
    in_test = forget[torch.isin(forget, test) | (forget >= data.n_train_pool)]
    if in_test.numel():
        raise ValueError(f"forget indices {_preview(in_test)} belong to the test set, which the model never trained "
                         f"on; forget indices must be training indices (0 to {data.n_train_pool - 1})")
    if torch.isin(retain, test).any() or (retain >= data.n_train_pool).any():
        raise ValueError("train and test indices overlap; a held-out image cannot also be trained on")
    outside = request[~torch.isin(request, forget)]
    if request.numel() == 0 or outside.numel():
        raise ValueError(f"the request must be a non-empty part of the forget set; {_preview(outside)} are not in "
                         "it (the forget set accumulates every request so far)")


def make_split(data: ImageDataset, forget: Indices, *, train: Indices | None = None, test: Indices | None = None,
               description: str = "", request: Indices | None = None) -> Split:
    """Check a forget set against the data and return the :class:`Split`.

    Args:
        data: the dataset the indices point into (global indices).
        forget: indices to forget; must be non-empty, unique, in range, training images, not all
            of them.
        train: the training indices of the original model (default: the whole training pool).
        test: held-out indices (default: the whole test pool).
        request: the newest request inside ``forget`` (sequences); default ``forget``.

    Raises:
        ValueError: with what was wrong and how to fix it (see :func:`check_split`).
    """
    forget = _as_index_tensor(forget, "forget indices")
    train = data.train_pool.cpu() if train is None else _as_index_tensor(train, "train indices")
    test = data.test_pool.cpu() if test is None else _as_index_tensor(test, "test indices")
    if forget.numel() == 0:
        raise ValueError("the forget set is empty: give at least one training index to forget")
    for what, indices in (("forget", forget), ("train", train)):
        bad = indices[(indices < 0) | (indices >= len(data))]
        if bad.numel():
            raise ValueError(f"{what} indices out of range [0, {len(data)}): {_preview(bad)}")
    repeated = _duplicates(train)
    if repeated.numel():
        raise ValueError(f"duplicate train indices: {_preview(repeated)}; give each index once")
    if torch.isin(train, test).any():
        raise ValueError("train and test indices overlap; a held-out image cannot also be trained on")
    outside = forget[~torch.isin(forget, train) & ~torch.isin(forget, test) & (forget < data.n_train_pool)]
    if outside.numel():
        raise ValueError(f"forget indices {_preview(outside)} are not in this split's training set, so there "
                         "is nothing to forget; pick them from split.train")
    retain = train[~torch.isin(train, forget)]
    request = forget if request is None else _as_index_tensor(request, "request indices")
    split = Split(forget.sort().values, retain.sort().values, test.sort().values, request.sort().values, description)
    check_split(data, split)
    return split


def random_split(data: ImageDataset, forget: int | float = 0.1, *, seed: int = 0, n_train: int | None = None,
                 n_test: int | None = None) -> Split:
    """Forget random training samples.

    Args:
        forget: a count (``100``) or a fraction of the training set (``0.1``).
        seed: makes the subsampling and the choice reproducible.
        n_train, n_test: use a random subset of the pools of this size (quick mode); default all.
    """
    generator = torch.Generator().manual_seed(seed)
    train = _subsample(data.train_pool, n_train, generator, "n_train")
    test = _subsample(data.test_pool, n_test, generator, "n_test")
    k = round(forget * len(train)) if isinstance(forget, float) else int(forget)
    if not 0 < k < len(train):
        raise ValueError(f"forget={forget} gives {k} of {len(train)} training samples; "
                         "ask for at least 1 and fewer than all")
    chosen = train[torch.randperm(len(train), generator=generator)[:k]]
    label = f"{forget:.0%} random" if isinstance(forget, float) else f"{k} random"
    return make_split(data, chosen, train=train, test=test, description=label)


def class_split(data: ImageDataset, forget_class: int | str, *, seed: int = 0, n_train: int | None = None,
                n_test: int | None = None) -> Split:
    """Forget every training sample of one class (given by index or name)."""
    if isinstance(forget_class, bool) or not isinstance(forget_class, (int, str)):
        raise TypeError(f"forget_class must be a class index (int) or name (str), got {forget_class!r}")
    if isinstance(forget_class, str):
        if forget_class not in data.classes:
            raise ValueError(f"unknown class {forget_class!r}; classes are {list(data.classes)}")
        forget_class = data.classes.index(forget_class)
    if not 0 <= forget_class < data.num_classes:
        raise ValueError(f"class {forget_class} out of range: there are {data.num_classes} classes")
    generator = torch.Generator().manual_seed(seed)
    train = _subsample(data.train_pool, n_train, generator, "n_train")
    test = _subsample(data.test_pool, n_test, generator, "n_test")
    chosen = train[data.labels.cpu()[train] == forget_class]
    split = make_split(data, chosen, train=train, test=test,
                       description=f"class {forget_class} ({data.classes[forget_class]})")
    split.meta["forget_class"] = forget_class
    return split


def request_sequence(data: ImageDataset, rounds: int, per_round: int, *, seed: int = 0,
                     n_train: int | None = None, n_test: int | None = None) -> list[Split]:
    """A stream of ``rounds`` erasure requests of ``per_round`` random samples each.

    Returns one :class:`Split` per round; round ``t``'s ``forget`` holds every index asked for up
    to and including round ``t``, and its ``request`` only the indices new in round ``t``.
    """
    if rounds < 1 or per_round < 1:
        raise ValueError(f"need rounds >= 1 and per_round >= 1, got rounds={rounds}, per_round={per_round}")
    generator = torch.Generator().manual_seed(seed)
    train = _subsample(data.train_pool, n_train, generator, "n_train")
    test = _subsample(data.test_pool, n_test, generator, "n_test")
    if rounds * per_round >= len(train):
        raise ValueError(f"{rounds} rounds x {per_round} samples would forget the whole training set "
                         f"({len(train)} samples)")
    order = train[torch.randperm(len(train), generator=generator)[: rounds * per_round]]
    return [make_split(data, order[: (t + 1) * per_round], train=train, test=test,
                       request=order[t * per_round: (t + 1) * per_round],
                       description=f"request {t + 1}/{rounds}")
            for t in range(rounds)]
