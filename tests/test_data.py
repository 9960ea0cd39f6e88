import os
import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from unlearnkit.data import (
    DatasetNotFoundError,
    check_split,
    class_split,
    load_dataset,
    make_split,
    random_split,
    request_sequence,
)


def test_embedded_dataset_is_balanced_uint8_tensors(data):
    assert data.images.dtype == torch.uint8 and data.images.shape == (12000, 1, 28, 28)
    assert data.n_train_pool == 10000 and data.num_classes == 10
    counts = torch.bincount(data.labels[data.train_pool], minlength=10)
    assert (counts == 1000).all()
    assert 0.2 < data.mean[0] < 0.4 and 0.25 < data.std[0] < 0.45


def test_random_split_is_disjoint_reproducible_and_sized(data):
    a = random_split(data, 0.1, seed=3)
    b = random_split(data, 0.1, seed=3)
    c = random_split(data, 0.1, seed=4)
    assert torch.equal(a.forget, b.forget) and not torch.equal(a.forget, c.forget)
    assert len(a.forget) == 1000 and len(a.retain) == 9000 and len(a.test) == 2000
    assert not torch.isin(a.forget, a.retain).any()
    assert torch.equal(a.train, torch.arange(10000))
    assert (a.test >= data.n_train_pool).all()


def test_subsampled_split_stays_inside_its_training_set(data):
    split = random_split(data, 100, seed=0, n_train=1000, n_test=300)
    assert len(split.train) == 1000 and len(split.test) == 300 and len(split.forget) == 100
    assert torch.isin(split.forget, split.train).all()


def test_class_split_takes_exactly_one_class(data):
    split = class_split(data, "Sneaker")
    assert (data.labels[split.forget] == 7).all() and len(split.forget) == 1000
    assert not (data.labels[split.retain] == 7).any()
    assert split.meta["forget_class"] == 7


def test_request_sequence_accumulates(data):
    rounds = request_sequence(data, rounds=4, per_round=25, seed=1)
    assert [len(r.forget) for r in rounds] == [25, 50, 75, 100]
    assert all(len(r.request) == 25 for r in rounds)
    assert torch.isin(rounds[0].forget, rounds[3].forget).all()
    assert not torch.isin(rounds[2].request, rounds[1].forget).any()


@pytest.mark.parametrize("forget, message", [
    ([], "empty"),
    ([5, 5], "duplicate"),
    ([-1], "out of range"),
    ([12000], "out of range"),
    ([10001], "test set"),
    ([0.5], "integer"),
])
def test_make_split_rejects_bad_forget_sets(data, forget, message):
    with pytest.raises(ValueError, match=message):
        make_split(data, torch.tensor(forget) if forget else torch.tensor([], dtype=torch.long))


def test_make_split_rejects_forgetting_everything_and_outsiders(data):
    train = torch.arange(100)
    with pytest.raises(ValueError, match="whole training set"):
        make_split(data, train, train=train)
    with pytest.raises(ValueError, match="not in this split's training set"):
        make_split(data, [500], train=train)
    with pytest.raises(ValueError, match="test set"):
        make_split(data, [205], train=train, test=torch.arange(200, 210))
    with pytest.raises(ValueError, match="overlap"):
        make_split(data, [5], train=train, test=torch.arange(50, 150))
    with pytest.raises(ValueError, match="boolean mask"):
        make_split(data, torch.zeros(10, dtype=torch.bool))


def test_bad_sizes_and_classes_are_rejected(data):
    with pytest.raises(ValueError, match="fewer than all"):
        random_split(data, 1.0)
    with pytest.raises(ValueError, match="unknown class"):
        class_split(data, "Dragon")
    with pytest.raises(ValueError, match="only 10000"):
        random_split(data, 10, n_train=20000)


def test_missing_dataset_error_names_files_place_and_fixes(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "MNIST" / "raw") in message
    assert "download=True" in message and "UNLEARNKIT_DATA" in message
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loads_through_torchvision_from_files_in_its_format(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    data = load_dataset("mnist", root=tmp_path)
    assert data.images.shape == (40, 1, 28, 28) and data.n_train_pool == 30 and data.num_classes == 10


def test_cifar10_loads_through_torchvision_from_files_in_its_format(tmp_path, monkeypatch):
    # torchvision checks the official release's MD5 sums; these stand-in files only share its format
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.images.shape == (24, 3, 32, 32) and data.n_train_pool == 20 and data.channels == 3
    expected = np.frombuffer(pickle.load(open(folder / "data_batch_1", "rb"))["data"][0].tobytes(), np.uint8)
    assert torch.equal(data.images[0], torch.from_numpy(expected.reshape(3, 32, 32).copy()))


def test_embedded_files_are_uncompressed_idx():
    from unlearnkit.data import EMBEDDED_DIR
    raw = EMBEDDED_DIR / "FashionMNIST" / "raw"
    header = (raw / "train-images-idx3-ubyte").read_bytes()[:16]
    assert struct.unpack(">HBBIII", header) == (0, 8, 3, 10000, 28, 28)


def test_check_split_rejects_hand_built_splits_that_make_no_sense(data):
    """Methods trust no Split: a hand-built one gets the same checks as make_split's."""
    good = make_split(data, torch.arange(10), train=torch.arange(100), test=torch.arange(10000, 10050))
    check_split(data, good)
    bad = {
        "test set": replace(good, forget=torch.arange(10000, 10010)),
        "out of range": replace(good, retain=torch.arange(10, 20001)),
        "duplicate retain": replace(good, retain=torch.cat([good.retain, good.retain[:1]])),
        "both forgotten and retained": replace(good, retain=torch.arange(5, 100)),
        "overlap": replace(good, test=torch.arange(50, 60)),
        "retain set is empty": replace(good, retain=torch.arange(0)),
        "test set is empty": replace(good, test=torch.arange(0)),
        "request": replace(good, request=torch.tensor([50])),
        "boolean mask": replace(good, forget=torch.zeros(100, dtype=torch.bool)),
    }
    for message, split in bad.items():
        with pytest.raises(ValueError, match=message):
            check_split(data, split)
    with pytest.raises(TypeError, match="Split"):
        check_split(data, {"forget": torch.arange(3)})


def test_make_split_checks_train_and_request_too(data):
    with pytest.raises(ValueError, match="duplicate train"):
        make_split(data, [1], train=[1, 2, 2, 3])
    with pytest.raises(ValueError, match="request"):
        make_split(data, [1, 2], train=torch.arange(10), request=[1, 9])
    with pytest.raises(TypeError, match="class index"):
        class_split(data, 3.0)
