"""MNIST and Fashion-MNIST from the four standard IDX files, with numpy only.

No JAX or PyTorch imports here: the PyTorch reference and the interop API use the same arrays.

Where the files are looked up, in this order (see ``load_dataset``):

1. ``data_dir`` (the CLI's ``--data-dir``), if given;
2. the environment variable ``FLAXDEPTH_DATA``, if set;
3. the user cache, ``$XDG_CACHE_HOME/flaxdepth/<name>`` (``~/.cache/flaxdepth/<name>``);
4. for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``;
5. a download from the public mirrors into the cache, checked against the checksums below.

A folder from 1 or 2 is used as it is (a missing file there is an error, nothing is downloaded);
it may hold the four files itself or a ``<name>`` subfolder with them. Each file may be
gzip-compressed (``.gz``) or not. Every problem with the files raises ``DataError`` with a
one-line message naming the file and saying how to fix it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataError",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "normalize",
    "read_idx",
    "subset",
]

#: Mean and standard deviation of the MNIST training pixels scaled to [0, 1], the constants
#: the notebook (torchvision ``Normalize((0.1307,), (0.3081,))``) normalizes with.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DATASETS = ("mnist", "fashion_mnist")

#: role -> file name without ".gz"; the same names for MNIST and Fashion-MNIST.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: sha256 of each file's *decompressed* bytes (re-compressing a file changes the .gz checksum,
#: never these).
SHA256 = {
    # From /work/shared/mnist/SHA256SUMS (the project's copy of MNIST); the same values are
    # listed for the original files in several independent third-party MNIST loaders.
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    # Computed here from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
    # (/usr/share/datasets/fashion-mnist/*.gz, zcat | sha256sum). Debian re-compressed the files,
    # so their .gz md5s differ from the ones zalandoresearch/fashion-mnist publishes, but the
    # decompressed payloads match the sha256s other projects list for the upstream files.
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

#: Public mirrors, tried in order; each serves "<file>.gz".
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

#: Folders a system package installs the files into (searched after the user cache).
SYSTEM_DIRS = {
    "mnist": (),
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

#: Seconds a download may wait on the network for any one connect or read.
DOWNLOAD_TIMEOUT = 10.0

_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim
_ROWS = _COLS = 28
_NUM_CLASSES = 10

_FIX_MISSING = (
    "pass --data-dir or set FLAXDEPTH_DATA to a folder holding train-images-idx3-ubyte(.gz), "
    "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
)
_FIX_DAMAGED = "replace it with a good copy (delete it if it is in the cache, to download it again)"


class DataError(Exception):
    """A data file is missing or unusable; the message is one line naming it and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset's train and test splits as uint8 arrays: images (N, 28, 28), labels (N,)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or labels.dtype != np.uint8:
                raise ValueError(f"{split} images and labels must be uint8")
            if images.ndim != 3 or images.shape[1:] != (_ROWS, _COLS) or labels.ndim != 1:
                raise ValueError(f"{split} images must be (N, 28, 28) and labels (N,)")
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} {split} images but {len(labels)} labels")

    def __repr__(self):
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)})"
        )


# ------------------------------------------------------------------------------ IDX reader


def read_idx(path, kind: str | None = None, sha256: str | None = None) -> np.ndarray:
    """Read one IDX file, gzip-compressed or not (told apart by content, not by name).

    Returns uint8 images (N, 28, 28) for magic 2051 or labels (N,) for magic 2049.
    ``kind`` ("images" or "labels") demands one of them; ``sha256``, if given, must match the
    decompressed bytes. Any problem raises ``DataError``.
    """
    path = Path(path)

    def bad(problem: str, fix: str = _FIX_DAMAGED) -> DataError:
        return DataError(f"{path} {problem}; {fix}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise bad("is missing", _FIX_MISSING) from None
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise bad("is truncated (its gzip stream ends early)") from None
        except (OSError, zlib.error) as e:
            raise bad(f"is corrupt (gzip: {e})") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 8 else None
    wanted = {"images": (_IMAGES_MAGIC,), "labels": (_LABELS_MAGIC,)}.get(
        kind, (_IMAGES_MAGIC, _LABELS_MAGIC)
    )
    if magic is None:
        raise bad(f"is truncated ({len(data)} bytes, not even an IDX header)")
    if magic not in wanted:
        raise bad(f"has bad magic {magic} (expected {' or '.join(map(str, wanted))}), "
                  f"it is not an IDX {kind or 'images or labels'} file")
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad(f"is truncated ({len(data)} bytes, not even an IDX header)")
    shape = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4))
    if shape[1:] not in ((), (_ROWS, _COLS)):
        raise bad(f"holds {shape[1]}x{shape[2]} images, expected 28x28")
    size = header + math.prod(shape)
    if len(data) != size:
        problem = "truncated" if len(data) < size else "corrupt"
        raise bad(f"is {problem} (its header promises {size} bytes, it holds {len(data)})")
    if sha256 is not None and (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise bad(
            f"fails its checksum (sha256 {digest[:16]}..., expected {sha256[:16]}...): damaged or "
            "not the official file",
            f"{_FIX_DAMAGED}, or pass verify=False for custom data",
        )
    array = np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()
    if ndim == 1 and shape[0] and array.max() >= _NUM_CLASSES:
        raise bad(f"is corrupt (label {array.max()} is outside 0..9)")
    return array


# ------------------------------------------------------------------------------ lookup


def cache_dir(name: str = "mnist") -> Path:
    """A dataset's cache folder: ``$XDG_CACHE_HOME/flaxdepth/<name>``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "flaxdepth" / _check_name(name)


def _check_name(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_find(folder, stem) is not None for stem in FILES.values())


def _dataset_folder(root: Path, name: str) -> Path:
    """``root/<name>`` (or ``root/<name with dashes>``) where that folder exists, else ``root``."""
    for sub in (name, name.replace("_", "-")):
        if (root / sub).is_dir():
            return root / sub
    return root


def _download(name: str, folder: Path) -> None:
    """Download the files ``folder`` lacks from the mirrors, verifying each before it lands."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = f"cannot create the cache folder {folder} ({e.strerror or e})"
        raise DataError(f"{problem}; {_FIX_MISSING}") from None
    for role, stem in FILES.items():
        if _find(folder, stem) is not None:
            continue
        target, errors = folder / f"{stem}.gz", []
        for mirror in MIRRORS[name]:
            url, tmp = mirror + target.name, None
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
                with os.fdopen(fd, "wb") as out:
                    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                        shutil.copyfileobj(response, out)
                read_idx(tmp, kind=role.split("_")[1], sha256=SHA256[name][stem])
                os.replace(tmp, target)  # atomic: the cache never holds a partial file
                break
            except DataError as e:
                errors.append(f"{url}: {str(e).split(';')[0].replace(str(tmp), 'the download')}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                reason = e.reason if type(e) is urllib.error.URLError else e  # drop "<urlopen error"
                errors.append(f"{url}: {reason}")
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
        else:
            tried = "; ".join(errors)
            raise DataError(
                f"{target} is missing and could not be downloaded ({tried}); "
                f"no network? {_FIX_MISSING}"
            )


def _locate(name: str, data_dir) -> Path:
    """The folder to read ``name`` from, downloading into the cache when nothing is found."""
    if data_dir is not None:
        return _dataset_folder(Path(data_dir).expanduser(), name)
    if env := os.environ.get("FLAXDEPTH_DATA"):
        return _dataset_folder(Path(env).expanduser(), name)
    cache = cache_dir(name)
    for folder in (cache, *SYSTEM_DIRS[name]):
        if _complete(folder):
            return folder
    _download(name, cache)
    return cache


# ------------------------------------------------------------------------------ public API


def load_dataset(
    name: str = "mnist", data_dir=None, source: str = "idx", verify: bool = True
) -> Dataset:
    """Load MNIST or Fashion-MNIST as uint8 arrays.

    name: "mnist" or "fashion_mnist". data_dir: a folder holding the four IDX files (or a
    ``<name>`` subfolder with them); None looks them up as the module docstring says.
    source: "idx" (the IDX files) or "tfds" (tensorflow-datasets, the optional extra
    ``flaxdepth[tfds]``; ``data_dir`` is then tfds's own data dir). verify: check the
    decompressed files against the known sha256s (turn it off for custom data in the same format).
    Downloads are always verified.
    """
    name = _check_name(name)
    if source == "tfds":
        return _load_tfds(name, data_dir)
    if source != "idx":
        raise DataError(f"unknown data source {source!r}; choose 'idx' or 'tfds'")
    folder = _locate(name, data_dir)
    arrays, paths = {}, {}
    for role, stem in FILES.items():
        paths[role] = _find(folder, stem) or folder / f"{stem}(.gz)"
        sha256 = SHA256[name][stem] if verify else None
        arrays[role] = read_idx(paths[role], kind=role.split("_")[1], sha256=sha256)
    for split in ("train", "test"):
        images, labels = f"{split}_images", f"{split}_labels"
        if len(arrays[images]) != len(arrays[labels]):
            raise DataError(
                f"{paths[images]} holds {len(arrays[images])} images but {paths[labels]} holds "
                f"{len(arrays[labels])} labels; the two files do not belong together, "
                "use a matching pair"
            )
    return Dataset(name=name, **arrays)


def _load_tfds(name: str, data_dir) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f'source="tfds" needs tensorflow-datasets, which cannot be imported ({e}); '
                        f'pip install "flaxdepth[tfds]", or use source="idx"') from None
    try:
        splits = tfds.load(name, split=["train", "test"], batch_size=-1,
                           data_dir=None if data_dir is None else str(data_dir))
        arrays = {}
        for split, tensors in zip(("train", "test"), tfds.as_numpy(splits)):
            images = np.asarray(tensors["image"], dtype=np.uint8).reshape(-1, _ROWS, _COLS)
            arrays[f"{split}_images"] = np.ascontiguousarray(images)
            arrays[f"{split}_labels"] = np.asarray(tensors["label"]).astype(np.uint8)
    except Exception as e:  # tfds fails in many ways (network, disk, versions): make it one line
        raise DataError(f"tensorflow-datasets could not load {name!r} ({type(e).__name__}: {e}); "
                        f'use source="idx" with --data-dir or FLAXDEPTH_DATA') from None
    return Dataset(name=name, **arrays)


def normalize(images_uint8: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 images (N, 28, 28) or (N, 1, 28, 28) -> normalized (N, 1, 28, 28) NCHW array.

    Exactly torchvision's ``ToTensor()`` then ``Normalize((MNIST_MEAN,), (MNIST_STD,))``: x / 255
    in ``dtype``, then (x - mean) / std with mean and std rounded to ``dtype`` first.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"normalize expects (N, 28, 28) or (N, 1, 28, 28), got {images.shape}")
    dtype = np.dtype(dtype)
    x = images.astype(dtype)  # a new array: the in-place steps below do the same arithmetic
    np.divide(x, np.asarray(255, dtype), out=x)
    np.subtract(x, np.asarray(MNIST_MEAN, dtype), out=x)
    np.divide(x, np.asarray(MNIST_STD, dtype), out=x)
    return x


def subset(
    dataset: Dataset, limit_train: int | None = None, limit_test: int | None = None
) -> Dataset:
    """The first ``limit_train`` training and ``limit_test`` test examples (None: all of them)."""
    for limit in (limit_train, limit_test):
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"limits must be non-negative integers or None, got {limit!r}")
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[:limit_train],
        train_labels=dataset.train_labels[:limit_train],
        test_images=dataset.test_images[:limit_test],
        test_labels=dataset.test_labels[:limit_test],
    )
