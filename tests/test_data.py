"""Image-folder and online TFDS builders on tiny generated data, no TensorFlow, no network."""
import contextlib
import errno
import fcntl
import gzip
import io
import logging
import os
import pathlib
import re
import struct
import tarfile
import tempfile
import threading
import types

import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.core.download import downloader
from tensorflow_datasets.core.utils import tqdm_utils

from fnlearn.data import DataError, ImageFolderBuilder, load_dataset, load_image_folder
from fnlearn.data import folder, online

CHECK_REACHABLE = online.check_reachable  # the real one, which `serve_files` replaces
LAYOUT = {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 2}}


def write_folder(root, layout=LAYOUT, shape=(8, 6, 3), seed=0):
    """Writes random PNGs as root/split/class/NN.png; returns {split: (images, labels)} in sorted order."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, classes in layout.items():
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(classes[name]):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if shape[-1] == 1 else pixels).save(root / split / name / f"{i:02d}.png")
                images.append(pixels)
                labels.append(label)
        arrays[split] = (np.stack(images), np.array(labels))
    return arrays


def prepared_files(data_dir):
    return sorted(pathlib.Path(data_dir).glob(f"{ImageFolderBuilder.name}/*/*/*.array_record*"))


@pytest.fixture
def count_generate(monkeypatch):
    """Counts calls of the folder builder's `_generate_examples` (once per split prepared)."""
    calls = []
    original = ImageFolderBuilder._generate_examples

    def counting(self, files):
        calls.append(len(files))
        return original(self, files)

    monkeypatch.setattr(ImageFolderBuilder, "_generate_examples", counting)
    return calls


def test_folder_loads_exact_pixels_and_is_prepared_once(tmp_path, count_generate):
    arrays = write_folder(tmp_path / "src")
    data_dir = tmp_path / "tfds"
    ds = load_image_folder(tmp_path / "src", data_dir=data_dir)
    assert ds.class_names == ("cat", "dog")
    assert ds.train_images.shape == (5, 8, 6, 3) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.skipped == ()
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), arrays[split][0])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), arrays[split][1])
    assert count_generate == [5, 3]
    files = prepared_files(data_dir)
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 2

    again = load_dataset(str(tmp_path / "src"), data_dir=data_dir)
    assert count_generate == [5, 3]  # nothing decoded or written the second time
    assert [f.stat().st_mtime_ns for f in prepared_files(data_dir)] == mtimes
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_preparing_prints_one_line_and_reading_prints_nothing(tmp_path, capfd, caplog):
    write_folder(tmp_path / "src")
    tfds_state = (logging.getLogger("absl").level, tqdm_utils._active)
    load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    (variant,) = (tmp_path / "tfds" / ImageFolderBuilder.name).glob("*/1.0.0")
    # Not TFDS's "Downloading and preparing dataset Unknown size ...", its config
    # dump (an absl warning) or its progress bars (stderr is not a terminal here).
    assert capfd.readouterr() == (
        "", f"preparing {tmp_path / 'src'} once as array_record files in {variant} (later runs read them back)\n"
    )
    assert [r.getMessage()[:60] for r in caplog.records if r.name == "absl"] == []
    load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage()[:60] for r in caplog.records if r.name == "absl"] == []
    assert (logging.getLogger("absl").level, tqdm_utils._active) == tfds_state  # restored


def test_grayscale_single_subfolder_and_distinct_sources(tmp_path, count_generate):
    # MNIST-style: grayscale PNGs under a single top-level subfolder.
    a = write_folder(tmp_path / "a" / "mnist", shape=(28, 28, 1), seed=1)
    b = write_folder(tmp_path / "b" / "mnist", shape=(28, 28, 1), seed=2)
    data_dir = tmp_path / "tfds"
    ds_a = load_image_folder(tmp_path / "a", data_dir=data_dir)
    ds_b = load_image_folder(tmp_path / "b", data_dir=data_dir)
    assert ds_a.train_images.shape == (5, 28, 28, 1)
    # Same folder name, different contents: prepared separately, never mixed up.
    np.testing.assert_array_equal(ds_a.train_images, a["train"][0])
    np.testing.assert_array_equal(ds_b.train_images, b["train"][0])
    assert len(count_generate) == 4

    # Changing a file changes the source's identity, so it is prepared afresh.
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a" / "mnist" / "train" / "cat" / "00.png")
    changed = load_image_folder(tmp_path / "a", data_dir=data_dir)
    assert changed.train_images[0].max() == 0 and len(count_generate) == 6


def test_torchvisions_other_image_types_are_read_too(tmp_path):
    arrays = write_folder(tmp_path / "src")
    cats = sorted((tmp_path / "src" / "train" / "cat").iterdir())
    for path, suffix in zip(cats, (".bmp", ".webp", ".tiff")):  # lossless (webp: with lossless=True)
        Image.open(path).save(path.with_suffix(suffix), lossless=True)
        path.unlink()
    data = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(data.train_images, arrays["train"][0])
    np.testing.assert_array_equal(data.train_labels, arrays["train"][1])


def test_16_bit_grayscale_keeps_one_channel_and_its_levels(tmp_path):
    levels = np.arange(24, dtype=np.uint16).reshape(4, 6) * 2800  # up to 64400: most over 8 bits
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "src" / split / name).mkdir(parents=True)
            Image.fromarray(levels).save(tmp_path / "src" / split / name / "0.png")  # opens as mode I;16
    data = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    assert data.train_images.shape == (2, 4, 6, 1)
    np.testing.assert_array_equal(data.train_images[0, ..., 0], levels >> 8)


def test_rgb_repeats_grayscale_into_three_channels(tmp_path):
    arrays = write_folder(tmp_path / "src", shape=(8, 6, 1))
    gray = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    rgb = gray.rgb()
    assert rgb.train_images.shape == (5, 8, 6, 3) and rgb.test_images.shape == (3, 8, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb.train_images[..., channel], arrays["train"][0][..., 0])
        np.testing.assert_array_equal(rgb.test_images[..., channel], arrays["test"][0][..., 0])
    assert rgb.rgb() is rgb and rgb.class_names == gray.class_names


def test_a_folder_whose_first_image_is_grayscale_but_not_all_is_rgb(tmp_path, count_generate):
    write_folder(tmp_path / "src", shape=(8, 6, 1))
    red = np.zeros((8, 6, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "src" / "test" / "dog" / "02.png")  # the last image read
    for _ in range(2):  # preparing, then reading the prepared copy
        ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
        assert ds.test_images.shape == (4, 8, 6, 3)
        np.testing.assert_array_equal(ds.test_images[-1], red)
        grey = np.asarray(Image.open(tmp_path / "src" / "train" / "cat" / "00.png"))
        np.testing.assert_array_equal(ds.train_images[0], np.repeat(grey[..., None], 3, -1))
    assert count_generate == [5, 4]  # prepared once


def make_tar(path, members):
    """Writes a .tar.gz from {name: bytes}; a None value makes a symlink to /etc/passwd."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_gz_is_extracted_once_into_data_dir(tmp_path, count_generate, capfd):
    arrays = write_folder(tmp_path / "src" / "tiny")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "tiny", arcname="tiny")
    data_dir = tmp_path / "tfds"
    ds = load_dataset(str(archive), data_dir=data_dir)
    np.testing.assert_array_equal(ds.test_images, arrays["test"][0])
    extracted = list((data_dir / folder.EXTRACT_DIR).iterdir())
    assert len(extracted) == 1 and extracted[0].name.startswith("tiny-")
    out, err = capfd.readouterr()
    assert out == "" and err.splitlines() == [
        f"extracting {archive} once into {extracted[0]}",
        f"preparing {archive} once as array_record files in {next(data_dir.glob('fnlearn_image_folder/*/1.0.0'))} "
        "(later runs read them back)",
    ]
    load_dataset(str(archive), data_dir=data_dir)
    assert capfd.readouterr() == ("", "")
    assert list((data_dir / folder.EXTRACT_DIR).iterdir()) == extracted and len(count_generate) == 2
    os.utime(archive, ns=(0, 0))  # a fresh copy of the same bytes: nothing is extracted or prepared again
    load_dataset(str(archive), data_dir=data_dir)
    assert list((data_dir / folder.EXTRACT_DIR).iterdir()) == extracted and len(count_generate) == 2
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # other bytes: extracted afresh
        tar.add(tmp_path / "src" / "tiny", arcname="tiny")
    load_dataset(str(archive), data_dir=data_dir)
    assert len(list((data_dir / folder.EXTRACT_DIR).iterdir())) == 2


def test_a_damaged_archive_is_refused_not_loaded(tmp_path):
    # A flipped byte in the gzip trailer leaves every member readable; only the CRC check sees it.
    write_folder(tmp_path / "src" / "tiny")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "tiny", arcname="tiny")
    data = bytearray(archive.read_bytes())
    data[-8] ^= 0x01  # the first byte of the stored CRC-32
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^cannot extract archive {re.escape(str(archive))}: CRC check failed"):
        load_dataset(str(archive), data_dir=tmp_path / "tfds")
    assert list((tmp_path / "tfds" / folder.EXTRACT_DIR).iterdir()) == []
    archive.write_bytes(b"no archive at all" * 64)  # one line, not one for each compression tarfile tried
    with pytest.raises(DataError, match=f"^cannot extract archive {re.escape(str(archive))}: [^\n]*$"):
        load_dataset(str(archive), data_dir=tmp_path / "tfds")


def test_hidden_files_are_not_images(tmp_path):
    arrays = write_folder(tmp_path / "src")
    (tmp_path / "src" / "train" / "cat" / "._00.png").write_bytes(b"AppleDouble litter")
    ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(ds.train_images, arrays["train"][0])


def test_loading_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    # TFDS's GCS info lookup would leave an empty tmp*tfds folder per new builder.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_folder(tmp_path / "src")
    load_dataset(str(tmp_path / "src"), data_dir=tmp_path / "tfds")
    assert list((tmp_path / "tmp").iterdir()) == []


# Extraction goes to tfds/fnlearn_extracted/<name>.incomplete-*/, so "../../../" climbs to tmp_path.
@pytest.mark.parametrize("bad", ["../evil.png", "../../../evil.png", "absolute", "link"])
def test_tar_rejects_unsafe_members_atomically(tmp_path, bad):
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    members = {"ds/train/a/0.png": png.getvalue(), "ds/test/a/0.png": png.getvalue()}
    bad = str(tmp_path / "evil.png") if bad == "absolute" else bad
    members[bad] = None if bad == "link" else b"x"
    make_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError, match=re.escape(repr(bad))):
        load_image_folder(tmp_path / "bad.tar.gz", data_dir=tmp_path / "tfds")
    # Nothing escaped, and no partial extraction is left that a later run could trust.
    assert not list(tmp_path.rglob("evil.png"))
    assert list((tmp_path / "tfds" / folder.EXTRACT_DIR).iterdir()) == []


def test_corrupt_and_truncated_images(tmp_path):
    write_folder(tmp_path / "src")
    bad_jpg = tmp_path / "src" / "train" / "dog" / "zz.jpg"
    bad_jpg.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="zz.jpg"):
        load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")

    good = (tmp_path / "src" / "test" / "cat" / "00.png").read_bytes()
    (tmp_path / "src" / "test" / "cat" / "01.png").write_bytes(good[: len(good) // 2])  # truncated
    ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert ds.skipped == ("train/dog/zz.jpg", "test/cat/01.png")
    assert len(ds.skipped) == 2 and len(ds.train_images) == 5 and len(ds.test_images) == 3
    # The names are stored with the prepared data, so a reload still reports them.
    again = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert again.skipped == ds.skipped and prepared_files(tmp_path / "tfds")  # read back, not prepared again


def test_skipped_files_are_named_in_the_warning(tmp_path, caplog):
    write_folder(tmp_path / "src")
    for i in range(7):
        (tmp_path / "src" / "train" / "cat" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert ds.skipped == tuple(f"train/cat/bad{i}.jpg" for i in range(7))
    (message,) = [r.getMessage() for r in caplog.records if r.name == folder.__name__]
    assert message.startswith("left out 7 corrupt images of ")
    assert message.endswith(": " + ", ".join(ds.skipped[:5]) + " and 2 more")


def test_mixed_image_sizes_name_the_file(tmp_path):
    write_folder(tmp_path / "src")
    Image.fromarray(np.zeros((9, 6, 3), np.uint8)).save(tmp_path / "src" / "test" / "dog" / "big.png")
    with pytest.raises(DataError, match="big.png"):
        load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")


@pytest.mark.parametrize(
    "breakage, named",
    [
        (lambda root: (root / "test").rename(root / "val"), "test/"),
        (lambda root: os.makedirs(root / "test" / "bird"), "bird"),
        (lambda root: [p.unlink() for p in (root / "train" / "cat").iterdir()], "cat"),
        (lambda root: (root / "test" / "dog").rename(root / "test" / "cow"), "cow"),
    ],
    ids=["no-test-split", "class-in-one-split", "empty-class", "class-mismatch"],
)
def test_wrong_layout_names_the_folder(tmp_path, breakage, named):
    write_folder(tmp_path / "src")
    breakage(tmp_path / "src")
    with pytest.raises(DataError, match=named):
        load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")


def test_missing_source_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"), data_dir=tmp_path / "tfds")
    with pytest.raises(DataError, match=r"cifar100: no such folder or \.tar\.gz, nor a data set fnlearn "
                                        r"downloads \(cifar10, mnist\)"):
        load_dataset("cifar100", data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("source", ["folder", "cifar10"])
def test_data_dir_that_is_not_a_folder_is_named_before_any_work(tmp_path, monkeypatch, source):
    write_folder(tmp_path / "src")
    source = str(tmp_path / "src") if source == "folder" else source
    # Were the data dir not checked first, this would be the download that fails.
    monkeypatch.setattr(online.Cifar10Builder, "URLS", {"archive": "https://fnlearn-test.invalid/cifar.tar.gz"})
    file = tmp_path / "file"
    file.write_text("")
    for data_dir, where in [(file, "is not a folder"), (file / "tfds", f"is under {file}, which is not a folder")]:
        with pytest.raises(DataError, match=f"^data dir {data_dir} {where}: pass --data-dir"):
            load_dataset(source, data_dir=data_dir)
    monkeypatch.setenv("TFDS_DATA_DIR", str(file))  # TFDS's default, when no data_dir is given
    with pytest.raises(DataError, match=f"^data dir {file} is not a folder"):
        load_dataset(source)


def test_default_data_dir_is_tfds_data_dir_read_at_each_load(tmp_path, monkeypatch):
    # conftest.py relies on this to keep the whole session out of ~/tensorflow_datasets.
    write_folder(tmp_path / "src")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
    load_image_folder(tmp_path / "src")
    assert len(prepared_files(tmp_path / "default")) == 2


def test_interrupted_preparation_is_never_taken_as_complete(tmp_path, monkeypatch):
    write_folder(tmp_path / "src")
    original = ImageFolderBuilder._generate_examples

    def dies_midway(self, files):
        for i, example in enumerate(original(self, files)):
            if i == 2:
                raise RuntimeError("killed mid-way")
            yield example

    monkeypatch.setattr(ImageFolderBuilder, "_generate_examples", dies_midway)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    assert prepared_files(tmp_path / "tfds") == []
    monkeypatch.setattr(ImageFolderBuilder, "_generate_examples", original)
    ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    assert len(ds.train_images) == 5 and len(prepared_files(tmp_path / "tfds")) == 2


def test_two_loads_at_once_prepare_once(tmp_path, monkeypatch, count_generate):
    # The second waits for the first's preparation and reads it; without the lock both
    # would prepare, and TFDS's rename of the second's copy would fail.
    arrays = write_folder(tmp_path / "src")
    counting = ImageFolderBuilder._generate_examples
    entered, release = threading.Event(), threading.Event()

    def held(self, files):
        entered.set()
        release.wait(60)
        yield from counting(self, files)

    monkeypatch.setattr(ImageFolderBuilder, "_generate_examples", held)
    loaded = {}

    def load(name):
        loaded[name] = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")

    locking = threading.Event()
    flock = fcntl.flock

    def noted_flock(fd, operation):
        if threading.current_thread().name == "second":
            locking.set()  # about to wait for the first's lock
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", noted_flock)
    first = threading.Thread(target=load, args=("first",), name="first")
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=load, args=("second",), name="second")
    second.start()
    assert locking.wait(60)
    second.join(0.5)
    assert second.is_alive()  # waiting, not preparing a copy of its own
    release.set()
    first.join(60)
    second.join(60)
    for name in ("first", "second"):
        np.testing.assert_array_equal(loaded[name].train_images, arrays["train"][0])
        np.testing.assert_array_equal(loaded[name].test_labels, arrays["test"][1])
    assert len(count_generate) == 2  # train and test, once


def test_a_file_system_without_locks_prepares_without_one(tmp_path, monkeypatch):
    # NFS refuses flock on a file not open for writing, some FUSE mounts have no locks at all.
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    arrays = write_folder(tmp_path / "src")
    ds = load_image_folder(tmp_path / "src", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(ds.train_images, arrays["train"][0])


def test_a_data_dir_that_cannot_be_created_is_named(tmp_path):
    write_folder(tmp_path / "src")
    # No user, root included, may make a folder in /proc.
    with pytest.raises(DataError, match="^data dir /proc/fnlearn_tfds cannot be created .*: pass --data-dir"):
        load_image_folder(tmp_path / "src", data_dir="/proc/fnlearn_tfds")


# --- online builders: parsers on files in the real formats, and the builders end to end ---


def cifar_batch(n, seed):
    """Records in CIFAR-10's binary format and the (N,32,32,3) images they hold."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = b"".join(bytes([label]) + image.tobytes() for label, image in zip(labels, chw))
    return data, chw.transpose(0, 2, 3, 1), labels


def idx_gz(array):
    """Gzipped idx bytes of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_cifar_batch_parser(tmp_path):
    data, images, labels = cifar_batch(3, seed=0)
    got_images, got_labels = online.parse_cifar10_batch(data)
    np.testing.assert_array_equal(got_images, images)  # CHW planes became HWC
    np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(DataError, match="3073"):
        online.parse_cifar10_batch(data[:-1])


def test_idx_parser():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path_data = gzip.decompress(idx_gz(array))
    np.testing.assert_array_equal(online.parse_idx(path_data), array)
    with pytest.raises(DataError, match="shape"):
        online.parse_idx(path_data[:-1])
    with pytest.raises(DataError, match="not an idx"):
        online.parse_idx(b"\x01\x02\x03\x04")


def use_test_urls(monkeypatch, builder):
    """Moves a builder's URLs to a test host: TFDS knows the real files' checksums, not our tiny ones."""
    urls = {key: "https://fnlearn-test.invalid/" + url.rsplit("/", 1)[1] for key, url in builder.URLS.items()}
    monkeypatch.setattr(builder, "URLS", urls)
    return urls


@pytest.fixture
def serve_files(monkeypatch):
    """Routes TFDS's HTTP fetch to in-memory bytes; the rest of the download manager runs for real."""
    served = {}

    @contextlib.contextmanager
    def fake_open_url(url, **kwargs):
        if url not in served:
            raise OSError(f"no route to {url}")
        yield types.SimpleNamespace(url=url, headers={}), iter([served[url]])

    monkeypatch.setattr(downloader, "_open_url", fake_open_url)
    monkeypatch.setattr(online, "check_reachable", lambda urls: None)
    return served


def test_cifar10_builder_end_to_end(tmp_path, monkeypatch, serve_files, capfd):
    batches = {f"data_batch_{i}.bin": cifar_batch(2, seed=i) for i in range(1, 6)}
    batches["test_batch.bin"] = cifar_batch(3, seed=9)
    archive = tmp_path / "cifar.tar.gz"
    make_tar(archive, {f"cifar-10-batches-bin/{name}": b[0] for name, b in batches.items()})
    serve_files[use_test_urls(monkeypatch, online.Cifar10Builder)["archive"]] = archive.read_bytes()
    ds = load_dataset("cifar10", data_dir=tmp_path / "tfds")
    assert capfd.readouterr() == ("", (
        f"preparing cifar10 downloaded from fnlearn-test.invalid once as array_record files in "
        f"{tmp_path / 'tfds' / 'fnlearn_cifar10' / '1.0.0'} (later runs read them back)\n"
    ))
    train = [batches[f"data_batch_{i}.bin"] for i in range(1, 6)]
    np.testing.assert_array_equal(ds.train_images, np.concatenate([b[1] for b in train]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([b[2] for b in train]))
    np.testing.assert_array_equal(ds.test_images, batches["test_batch.bin"][1])
    assert ds.class_names[0] == "airplane" and ds.source == "cifar10"
    assert list((tmp_path / "tfds" / "downloads").rglob("*cifar-10-binary*"))  # cached by TFDS


class Interrupted(Exception):
    pass


def test_a_download_tfds_holds_is_used_offline(tmp_path, monkeypatch, serve_files):
    batches = [cifar_batch(2, seed=i) for i in range(6)]
    archive = tmp_path / "cifar.tar.gz"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    make_tar(archive, {f"cifar-10-batches-bin/{name}": b[0] for name, b in zip(names, batches)})
    serve_files[use_test_urls(monkeypatch, online.Cifar10Builder)["archive"]] = archive.read_bytes()
    read_arrays = online.Cifar10Builder._read_arrays

    def interrupted(self, paths):
        raise Interrupted  # a run stopped after its download, before preparing

    monkeypatch.setattr(online.Cifar10Builder, "_read_arrays", interrupted)
    with pytest.raises(Interrupted):
        load_dataset("cifar10", data_dir=tmp_path / "tfds")
    monkeypatch.setattr(online.Cifar10Builder, "_read_arrays", read_arrays)
    serve_files.clear()  # offline now: every fetch fails, and the probe cannot resolve the .invalid host
    monkeypatch.setattr(online, "check_reachable", CHECK_REACHABLE)
    ds = load_dataset("cifar10", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(ds.test_images, batches[5][1])


def test_mnist_builder_end_to_end(tmp_path, monkeypatch, serve_files):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (4, 28, 28)),
        "train_labels": rng.integers(0, 10, 4),
        "test_images": rng.integers(0, 256, (2, 28, 28)),
        "test_labels": rng.integers(0, 10, 2),
    }
    for key, url in use_test_urls(monkeypatch, online.MnistBuilder).items():
        serve_files[url] = idx_gz(arrays[key])
    ds = load_dataset("mnist", data_dir=tmp_path / "tfds")
    assert ds.train_images.shape == (4, 28, 28, 1) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.class_names == tuple("0123456789")


def test_offline_download_fails_fast_with_one_clear_message(tmp_path, monkeypatch):
    # `.invalid` never resolves (RFC 2606), online or not, so this test never downloads.
    monkeypatch.setattr(online.Cifar10Builder, "URLS", {"archive": "https://fnlearn-test.invalid/cifar.tar.gz"})
    with pytest.raises(DataError, match="could not download .*--data PATH") as info:
        load_dataset("cifar10", data_dir=tmp_path / "tfds")
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert not list((tmp_path / "tfds").glob("fnlearn_cifar10/*/*.array_record*"))
