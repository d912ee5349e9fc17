"""Tests of flaxdepth.data: the IDX reader, the folder lookup, downloads, errors, normalize."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import struct
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from flaxdepth import data
from flaxdepth.data import DataError, Dataset, load_dataset, normalize, read_idx, subset

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = tuple(data.FILES.values())
DOWNLOAD_FAILED = "train-images-idx3-ubyte.gz is missing and could not be downloaded"

needs_mnist = pytest.mark.skipif(
    not all((SHARED_MNIST / f"{stem}.gz").is_file() for stem in STEMS),
    reason=f"the project's MNIST copy is absent ({SHARED_MNIST} lacks the four .gz files)",
)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No FLAXDEPTH_DATA, a private cache, no system folders, and no network for any test."""
    monkeypatch.delenv("FLAXDEPTH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": ()})

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr("urllib.request.urlopen", no_network)


# ------------------------------------------------------------------------------ helpers


def idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def images_idx(n: int, fill: int = 0) -> bytes:
    return idx(2051, (n, 28, 28), np.full((n, 28, 28), fill, np.uint8).tobytes())


def labels_idx(n: int) -> bytes:
    return idx(2049, (n,), (np.arange(n) % 10).astype(np.uint8).tobytes())


def crafted(n_train=3, n_test=2, fill=0) -> dict[str, bytes]:
    """The decompressed bytes of a tiny valid dataset, by file stem."""
    return {
        "train-images-idx3-ubyte": images_idx(n_train, fill),
        "train-labels-idx1-ubyte": labels_idx(n_train),
        "t10k-images-idx3-ubyte": images_idx(n_test, fill),
        "t10k-labels-idx1-ubyte": labels_idx(n_test),
    }


@pytest.fixture
def pinned(monkeypatch) -> dict[str, bytes]:
    """Make the default crafted dataset MNIST's "known" checksums, so verify=True accepts it."""
    contents = crafted()
    sums = {stem: hashlib.sha256(raw).hexdigest() for stem, raw in contents.items()}
    monkeypatch.setitem(data.SHA256, "mnist", sums)
    return contents


def write_dataset(folder: Path, n_train=3, n_test=2, gz=True, fill=0, **replace: bytes) -> Path:
    """Four small valid IDX files in ``folder``; ``replace`` swaps a file's (raw) bytes by stem."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = crafted(n_train, n_test, fill)
    for stem, raw in contents.items():
        if stem.replace("-", "_") in replace:
            (folder / f"{stem}.gz").write_bytes(replace[stem.replace("-", "_")])
        elif gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return folder


def one_line_error(excinfo, name: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert name in message, message
    return message


# ------------------------------------------------------------------------------ real MNIST


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not all((SHARED_MNIST / f"{stem}.gz").is_file() for stem in STEMS):
        pytest.skip(f"the project's MNIST copy is absent ({SHARED_MNIST} lacks the four .gz files)")
    return load_dataset("mnist", data_dir=SHARED_MNIST)


def test_real_mnist_shapes_dtypes_and_labels(mnist):
    assert mnist.name == "mnist"
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    for array in (mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels):
        assert array.dtype == np.uint8 and array.flags.writeable and array.flags.c_contiguous
    assert np.bincount(mnist.train_labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]
    assert np.bincount(mnist.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert "train=60000" in repr(mnist)


def test_normalized_mnist_has_zero_mean_unit_std(mnist):
    x = normalize(mnist.train_images)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.float32
    counts = np.bincount(mnist.train_images.ravel(), minlength=256)  # pixel stats from a histogram
    values = np.arange(256) / 255
    mean = counts @ values / counts.sum()
    std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
    assert abs(mean - data.MNIST_MEAN) < 1e-4 and abs(std - data.MNIST_STD) < 1e-4
    assert abs(x.mean(dtype=np.float64)) < 1e-3
    assert abs(x.std(dtype=np.float64) - 1) < 1e-3


@needs_mnist
def test_plain_file_reads_like_its_gz(tmp_path, mnist):
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(gzip.decompress((SHARED_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()))
    sha256 = data.SHA256["mnist"]["t10k-images-idx3-ubyte"]
    np.testing.assert_array_equal(read_idx(plain, kind="images", sha256=sha256), mnist.test_images)


def test_plain_and_gz_files_mix(tmp_path, pinned):
    folder = write_dataset(tmp_path / "d", gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    labels = pinned["t10k-labels-idx1-ubyte"]
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    loaded = load_dataset("mnist", data_dir=folder)  # verify=True against the pinned checksums
    assert loaded.train_images.shape == (3, 28, 28) and loaded.test_labels.tolist() == [0, 1]


@pytest.mark.skipif(
    not FASHION_SYSTEM_DIR.is_dir(),
    reason=f"Debian's dataset-fashion-mnist is absent ({FASHION_SYSTEM_DIR})",
)
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (), "fashion_mnist": (FASHION_SYSTEM_DIR,)})
    fashion = load_dataset("fashion-mnist")  # dashes accepted; found after the (empty) cache
    assert fashion.name == "fashion_mnist"
    assert fashion.train_images.shape == (60000, 28, 28)
    assert fashion.test_images.shape == (10000, 28, 28)
    assert np.bincount(fashion.train_labels).tolist() == [6000] * 10
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10
    assert fashion.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


# ------------------------------------------------------------------------------ normalize, subset


def test_normalize_is_torchvision_arithmetic():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(2, axis=0)
    images = np.pad(images, ((0, 0), (6, 6), (6, 6)))
    x = normalize(images)
    f32 = np.float32
    expected = (images.astype(f32) / f32(255) - f32(0.1307)) / f32(0.3081)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], expected)
    np.testing.assert_array_equal(normalize(images[:, None]), x)  # NCHW input too
    x64 = normalize(images, dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64[:, 0], (images / 255.0 - 0.1307) / 0.3081)
    with pytest.raises(TypeError):
        normalize(images.astype(np.float32))
    with pytest.raises(ValueError):
        normalize(images[0])


def test_normalize_matches_torch_bitwise():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    # torchvision: ToTensor() = x.to(float32).div(255); Normalize = x.sub_(mean).div_(std) with
    # mean and std as float32 tensors (torchvision.transforms.functional.normalize).
    t = torch.from_numpy(images[:, None]).to(torch.float32).div(255)
    mean = torch.as_tensor((data.MNIST_MEAN,), dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor((data.MNIST_STD,), dtype=torch.float32).view(-1, 1, 1)
    t = t.sub_(mean).div_(std)
    np.testing.assert_array_equal(normalize(images), t.numpy())


def test_subset_takes_the_first_examples(tmp_path):
    full = load_dataset(data_dir=write_dataset(tmp_path / "d", n_train=7, n_test=5), verify=False)
    small = subset(full, limit_train=4, limit_test=2)
    assert small.name == full.name
    assert small.train_images.shape == (4, 28, 28) and small.test_labels.shape == (2,)
    np.testing.assert_array_equal(small.train_labels, full.train_labels[:4])
    unchanged = subset(full, limit_train=None, limit_test=100)
    assert len(unchanged.train_labels) == 7 and len(unchanged.test_labels) == 5
    with pytest.raises(ValueError):
        subset(full, limit_train=-1)


def test_dataset_checks_its_arrays():
    x, y = np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8)
    with pytest.raises(ValueError):
        Dataset("mnist", x, y[:1], x, y)
    with pytest.raises(ValueError):
        Dataset("mnist", x.astype(np.float32), y, x, y)
    with pytest.raises(AttributeError):  # frozen
        Dataset("mnist", x, y, x, y).name = "other"


# ------------------------------------------------------------------------------ lookup order


def test_lookup_order_data_dir_env_cache(tmp_path, monkeypatch):
    explicit = write_dataset(tmp_path / "explicit", n_train=3)
    env = write_dataset(tmp_path / "env", n_train=4)
    cache = write_dataset(tmp_path / "xdg-cache" / "flaxdepth" / "mnist", n_train=5)
    monkeypatch.setenv("FLAXDEPTH_DATA", str(env))
    assert len(load_dataset(data_dir=explicit, verify=False).train_labels) == 3
    assert len(load_dataset(verify=False).train_labels) == 4
    monkeypatch.delenv("FLAXDEPTH_DATA")
    assert len(load_dataset(verify=False).train_labels) == 5
    assert data.cache_dir("mnist") == cache


def test_cache_defaults_to_home_without_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_dataset(tmp_path / "home" / ".cache" / "flaxdepth" / "mnist", n_train=6)
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "flaxdepth" / "mnist"
    assert len(load_dataset(verify=False).train_labels) == 6


def test_cache_beats_system_dir(tmp_path, monkeypatch):
    system = write_dataset(tmp_path / "system", n_train=8)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": (system,), "fashion_mnist": ()})
    assert len(load_dataset(verify=False).train_labels) == 8
    write_dataset(tmp_path / "xdg-cache" / "flaxdepth" / "mnist", n_train=5)
    assert len(load_dataset(verify=False).train_labels) == 5


def test_data_dir_may_hold_a_subfolder_per_dataset(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_dataset(root / "mnist", n_train=3)
    write_dataset(root / "fashion-mnist", n_train=4)
    assert len(load_dataset("mnist", data_dir=root, verify=False).train_labels) == 3
    monkeypatch.setenv("FLAXDEPTH_DATA", str(root))
    assert len(load_dataset("fashion_mnist", verify=False).train_labels) == 4


def test_explicit_folder_is_authoritative(tmp_path):
    """A named folder lacking a file is an error; the cache is not searched, nothing downloaded."""
    write_dataset(tmp_path / "xdg-cache" / "flaxdepth" / "mnist")
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_dir=tmp_path / "empty", verify=False)
    message = one_line_error(excinfo, "train-images-idx3-ubyte(.gz) is missing")
    assert "--data-dir" in message and "FLAXDEPTH_DATA" in message


# ------------------------------------------------------------------------------ errors


def _truncated_gz(raw: bytes) -> bytes:
    packed = gzip.compress(raw)
    return packed[: len(packed) // 2]


def _corrupt_gz(raw: bytes) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    packed = bytearray(gzip.compress(raw + noise))
    packed[len(packed) // 2 : len(packed) // 2 + 50] = b"\xff" * 50
    return bytes(packed)


def _bad_crc_gz(raw: bytes) -> bytes:
    packed = bytearray(gzip.compress(raw))
    packed[-8] ^= 0xFF
    return bytes(packed)


@pytest.mark.parametrize(
    "stem, content, expected",
    [
        ("train_images_idx3_ubyte", _truncated_gz(images_idx(3)), "truncated"),
        ("train_labels_idx1_ubyte", _corrupt_gz(labels_idx(3)), "corrupt"),
        ("t10k_images_idx3_ubyte", _bad_crc_gz(images_idx(2)), "corrupt"),
        ("t10k_labels_idx1_ubyte", gzip.compress(images_idx(2)), "bad magic 2051"),
        ("train_images_idx3_ubyte", gzip.compress(b"\x00\x00\x08\x03\x00"), "truncated"),
        ("train_images_idx3_ubyte", gzip.compress(images_idx(3)[:-5]), "truncated"),
        ("train_images_idx3_ubyte", gzip.compress(images_idx(3) + b"x"), "corrupt"),
        ("train_images_idx3_ubyte", idx(2051, (3, 32, 32), bytes(3 * 32 * 32)), "32x32"),
        ("train_labels_idx1_ubyte", idx(2049, (3,), bytes([1, 2, 10])), "outside 0..9"),
        ("t10k_images_idx3_ubyte", b"", "truncated"),
    ],
    ids=["truncated-gz", "corrupt-gz", "bad-crc", "wrong-magic", "short-header", "short-payload",
         "trailing-bytes", "wrong-size", "bad-label", "empty"],
)
def test_damaged_files_raise_one_line_data_error(tmp_path, stem, content, expected):
    folder = write_dataset(tmp_path / "d", **{stem: content})
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_dir=folder, verify=False)
    message = one_line_error(excinfo, str(folder / (stem.replace("_", "-") + ".gz")))
    assert expected in message


def test_checksum_mismatch(tmp_path):
    folder = write_dataset(tmp_path / "d")
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=folder)  # verify=True: crafted files are not MNIST
    message = one_line_error(excinfo, "train-images-idx3-ubyte.gz")
    assert "checksum" in message and "verify=False" in message
    assert len(load_dataset("mnist", data_dir=folder, verify=False).train_labels) == 3


def test_label_image_count_mismatch(tmp_path):
    three_labels = gzip.compress(labels_idx(3))
    folder = write_dataset(tmp_path / "d", n_test=4, t10k_labels_idx1_ubyte=three_labels)
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_dir=folder, verify=False)
    message = one_line_error(excinfo, "t10k-images-idx3-ubyte.gz holds 4 images")
    assert "t10k-labels-idx1-ubyte.gz holds 3 labels" in message


def test_read_idx_checks_kind_and_reads_either_kind(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(labels_idx(5))
    assert read_idx(path).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="bad magic 2049"):
        read_idx(path, kind="images")
    with pytest.raises(DataError, match="is missing"):
        read_idx(tmp_path / "nope.gz")


def test_unknown_name_or_source():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown data source"):
        load_dataset("mnist", source="torchvision")


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", source="tfds")
    one_line_error(excinfo, 'pip install "flaxdepth[tfds]"')


# ------------------------------------------------------------------------------ downloads


def _cache_files(tmp_path) -> list[str]:
    folder = tmp_path / "xdg-cache" / "flaxdepth" / "mnist"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_download_without_network_fails_with_one_line(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    message = one_line_error(excinfo, DOWNLOAD_FAILED)
    assert "network disabled in tests" in message and "FLAXDEPTH_DATA" in message
    assert "ossci-datasets" in message and "cvdf-datasets" in message
    assert _cache_files(tmp_path) == []  # no partial files


def _serve(files: dict[str, bytes], fail_hosts=(), log=None):
    def urlopen(url, timeout=None):
        assert timeout is not None and timeout <= 30
        if log is not None:
            log.append(url)
        if any(host in url for host in fail_hosts):
            raise urllib.error.HTTPError(url, 503, "Service Unavailable", {}, None)
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    return urlopen


def test_download_falls_back_to_the_second_mirror(tmp_path, monkeypatch, pinned):
    files = {f"{stem}.gz": gzip.compress(raw) for stem, raw in pinned.items()}
    log = []
    monkeypatch.setattr("urllib.request.urlopen", _serve(files, fail_hosts=("ossci",), log=log))
    downloaded = load_dataset("mnist")
    assert len(log) == 8 and all("cvdf-datasets" in url for url in log[1::2])
    assert _cache_files(tmp_path) == sorted(f"{stem}.gz" for stem in STEMS)
    assert downloaded.train_labels.tolist() == [0, 1, 2]
    log.clear()
    load_dataset("mnist")  # now from the cache
    assert log == []


class _DroppedConnection(io.BytesIO):
    """A response that breaks off after its first chunk."""

    def read(self, size=-1):
        if self.tell():
            raise http.client.IncompleteRead(b"", 1000)
        return super().read(100 if size < 0 else min(size, 100))


@pytest.mark.parametrize(
    "payload, expected",
    [
        (gzip.compress(images_idx(3)), "checksum"),
        (gzip.compress(images_idx(3))[:30], "truncated"),
        (_DroppedConnection(gzip.compress(images_idx(30))), "IncompleteRead"),
    ],
    ids=["not-the-official-file", "truncated", "connection-dropped"],
)
def test_download_rejects_a_bad_payload_and_leaves_nothing(
    tmp_path, monkeypatch, payload, expected
):
    def urlopen(url, timeout=None):
        return payload if isinstance(payload, io.BytesIO) else io.BytesIO(payload)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    message = one_line_error(excinfo, DOWNLOAD_FAILED)
    assert expected in message and ".part" not in message
    assert _cache_files(tmp_path) == []


def test_download_completes_a_partial_cache(tmp_path, monkeypatch, pinned):
    """Files already in the cache (here a plain one) are kept, only the others are fetched."""
    cache = tmp_path / "xdg-cache" / "flaxdepth" / "mnist"
    cache.mkdir(parents=True)
    (cache / "t10k-labels-idx1-ubyte").write_bytes(pinned["t10k-labels-idx1-ubyte"])
    files = {f"{stem}.gz": gzip.compress(pinned[stem]) for stem in STEMS[:3]}
    log = []
    monkeypatch.setattr("urllib.request.urlopen", _serve(files, log=log))
    downloaded = load_dataset("mnist")
    assert len(log) == 3 and not any("t10k-labels" in url for url in log)
    assert _cache_files(tmp_path) == sorted([*(f"{stem}.gz" for stem in STEMS[:3]), STEMS[3]])
    assert downloaded.test_labels.tolist() == [0, 1]
