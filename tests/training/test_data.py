"""Datasets: readers on generated files, splits, normalisation, label noise, errors, augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from sassha_tune.errors import DataError, UserError
from sassha_tune.training.data import DATASETS, Splits, augment_batch, load_dataset, read_idx


def _write_idx(path, arr: np.ndarray, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr)
    return arrays


def _fake_cifar10(root, per_batch=8, n_test=6):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches.append((data, labels))
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {
                    "batch_label": f"training batch {i} of 5",
                    "data": data,
                    "labels": labels,
                    "filenames": [f"img{j}.png" for j in range(per_batch)],
                },
                f,
                protocol=2,
            )
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": list(range(n_test))}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_vis": 3072}, f)
    return batches, test


def test_datasets_list():
    assert {"mnist1d", "digits", "fashion_mnist", "cifar10", "cifar100", "synthetic", "custom"} <= set(
        DATASETS
    )


def test_idx_reader_and_fashion_loader(tmp_path):
    arrays = _fake_fashion(tmp_path)
    img = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert img.shape == (30, 28, 28) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, arrays["train-images-idx3-ubyte.gz"])
    s = load_dataset("fashion_mnist", str(tmp_path), val_fraction=0.2)
    assert s.x_train.shape == (24, 1, 28, 28) and s.x_val.shape == (6, 1, 28, 28)
    assert s.x_test.shape == (10, 1, 28, 28) and s.x_train.dtype == torch.float32
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and s.augment == "crop_flip"
    assert torch.equal(s.y_test, torch.arange(10))
    # train + val together are the original training labels
    assert sorted((torch.cat([s.y_train, s.y_val])).tolist()) == sorted((np.arange(30) % 10).tolist())


def test_idx_reader_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"ab")
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


def test_cifar10_reader(tmp_path):
    batches, test = _fake_cifar10(tmp_path)
    s = load_dataset("cifar10", str(tmp_path), val_fraction=0.0, options={"normalize": False})
    assert s.x_train.shape == (40, 3, 32, 32) and s.x_test.shape == (6, 3, 32, 32)
    assert s.x_val.shape == (0, 3, 32, 32) and s.augment == "crop_flip" and s.num_classes == 10
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    first = batches[0][0][0]
    assert s.x_train[0, 1, 2, 3].item() == first[1024 + 2 * 32 + 3]
    assert s.y_train.tolist() == sum((b[1] for b in batches), [])
    assert torch.equal(s.x_test[5].flatten(), torch.from_numpy(test[5].astype(np.float32)))
    # data_dir may also be the batches folder itself
    s2 = load_dataset(
        "cifar10", str(tmp_path / "cifar-10-batches-py"), val_fraction=0.0, options={"normalize": False}
    )
    assert torch.equal(s.x_train, s2.x_train)


def test_cifar100_reader(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 4)):
        with open(d / split, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": list(range(n)),
                    "coarse_labels": [i % 20 for i in range(n)],
                },
                f,
            )
    s = load_dataset("cifar100", str(tmp_path), val_fraction=0.25)
    assert s.num_classes == 100 and s.x_train.shape == (9, 3, 32, 32) and len(s.y_test) == 4
    assert load_dataset("cifar100", str(tmp_path), options={"labels": "coarse"}).num_classes == 20


def test_cifar_refuses_code_in_pickles(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": print}, f)
    with pytest.raises(DataError, match="Cannot read CIFAR batch"):
        load_dataset("cifar10", str(tmp_path))


def test_missing_data_messages(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert (
        str(tmp_path) in msg and "cifar-10-batches-py" in msg and "task.data_dir" in msg and "\n" not in msg
    )
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))
    # an incomplete folder names the missing file
    _fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_dataset("fashion_mnist", str(tmp_path / "fm"))
    with pytest.raises(DataError, match="Unknown dataset 'imagenet'.*mnist1d"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="Unknown option"):
        load_dataset("synthetic", options={"bogus": 1})
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=1.5)


def test_mnist1d_cached_and_standard(tmp_path):
    s = load_dataset("mnist1d", str(tmp_path))
    assert (tmp_path / next(p.name for p in tmp_path.iterdir() if p.suffix == ".npz")).is_file()
    assert (
        s.x_train.shape == (3600, 1, 40) and s.x_val.shape == (400, 1, 40) and s.x_test.shape == (1000, 1, 40)
    )
    assert s.input_shape == (1, 40) and s.num_classes == 10 and s.augment is None
    again = load_dataset("mnist1d", str(tmp_path))  # from the cache
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_test, again.y_test)
    assert abs(s.x_train.mean().item()) < 1e-4 and abs(s.x_train.std().item() - 1) < 1e-3


def test_digits_and_split_is_seeded():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert a.input_shape == (1, 8, 8) and len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.y_val, c.y_val)
    assert torch.equal(a.y_test, c.y_test)  # the test set does not depend on the seed


def test_normalisation_per_channel():
    s = load_dataset("synthetic", options={"shape": [3, 6, 6], "n": 300, "n_test": 10})
    mean = s.x_train.mean(dim=(0, 2, 3))
    std = s.x_train.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-4)
    assert s.normalization is not None and len(s.normalization[0]) == 3


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_label_noise_exact(fraction):
    s = load_dataset("synthetic", label_noise=fraction, seed=3, options={"n": 500, "classes": 4})
    n_train = len(s.y_train)
    expected = round(fraction * n_train)
    if fraction == 0:
        assert s.noisy_indices is None and s.y_train_clean is None
        return
    changed = (s.y_train != s.y_train_clean).nonzero().flatten()
    assert len(changed) == expected and torch.equal(changed, s.noisy_indices)
    clean = load_dataset("synthetic", seed=3, options={"n": 500, "classes": 4})
    assert torch.equal(clean.y_train, s.y_train_clean) and torch.equal(clean.y_val, s.y_val)
    again = load_dataset("synthetic", label_noise=fraction, seed=3, options={"n": 500, "classes": 4})
    assert torch.equal(again.y_train, s.y_train)


def test_synthetic_teacher_labels_are_learnable_and_balanced():
    s = load_dataset("synthetic", options={"n": 2000, "classes": 5})
    counts = torch.bincount(s.y_train, minlength=5)
    assert counts.min() > 0.05 * len(s.y_train)


def test_max_train_and_max_test():
    s = load_dataset(
        "synthetic", val_fraction=0.5, options={"n": 100, "n_test": 50, "max_train": 40, "max_test": 7}
    )
    assert len(s.y_train) + len(s.y_val) == 40 and len(s.y_test) == 7


def test_custom_dataset_plugin():
    s = load_dataset("custom", options={"factory": "plugins_example:blobs", "n": 100})
    assert s.name == "blobs" and s.num_classes == 2 and s.input_shape == (5,)
    assert len(s.y_train) == 90 and len(s.y_val) == 10 and len(s.y_test) == 50
    t = load_dataset("custom", options={"factory": "plugins_example:blobs", "as_tuple": True})
    assert t.num_classes == 2 and len(t.y_test) == 50
    with pytest.raises(UserError, match="package.module:function"):
        load_dataset("custom", options={})
    with pytest.raises(UserError, match="cannot import"):
        load_dataset("custom", options={"factory": "no_such_module_xyz:f"})
    with pytest.raises(UserError, match="must return"):
        load_dataset("custom", options={"factory": "plugins_example:broken"})


def test_custom_splits_passthrough():
    z = torch.zeros(4, 2)
    y = torch.zeros(4, dtype=torch.long)
    splits = Splits(z, y, z, y, z, y, num_classes=2, input_shape=(2,), augment=None, name="x")
    import plugins_example

    plugins_example.ready = lambda **kw: splits
    assert load_dataset("custom", options={"factory": "plugins_example:ready"}) is splits


def test_augment_batch_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = augment_batch(x, "crop", g)
    assert out.shape == x.shape
    # every output is a shifted copy: its nonzero values are a contiguous window of the input
    for n in range(2):
        nz = out[n, 0][out[n, 0] != 0]
        assert set(nz.tolist()) <= set(x[n, 0].flatten().tolist())
    g = torch.Generator().manual_seed(0)
    flips = augment_batch(torch.ones(64, 1, 5, 5), "crop_flip", g)
    assert flips.shape == (64, 1, 5, 5)
    # same generator state -> same result
    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # an unpadded, unflipped copy must be possible: offset (4, 4) keeps the image
    seen_identity = any(
        torch.equal(augment_batch(x[:1], "crop", torch.Generator().manual_seed(s)), x[:1]) for s in range(200)
    )
    assert seen_identity
    sig = augment_batch(torch.ones(3, 2, 10), "crop", torch.Generator().manual_seed(0))
    assert sig.shape == (3, 2, 10)
    assert augment_batch(x, None, g) is x
    with pytest.raises(UserError):
        augment_batch(x, "rotate", g)


# --------------------------------------------------------------------------------------------
# text (language modelling)


def _text_dir(tmp_path, n_words=3000):
    import random as _random

    rng = _random.Random(0)
    words = "the a cat dog sat on mat ran fast and".split()
    (tmp_path / "b.txt").write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    (tmp_path / "a.txt").write_text("héllo wörld " * 50, encoding="utf-8")  # multi-byte UTF-8: bytes, not characters
    (tmp_path / "skip.md").write_text("not matched by the default pattern", encoding="utf-8")
    return tmp_path


def test_text_splits_are_contiguous_byte_windows(tmp_path):
    d = _text_dir(tmp_path)
    raw = (d / "a.txt").read_bytes() + (d / "b.txt").read_bytes()  # name order
    s = load_dataset("text", str(d), val_fraction=0.1, options={"block_size": 16, "test_fraction": 0.2})
    assert s.is_language and s.num_classes == 256 and s.input_shape == (16,)
    n_val, n_test = round(0.1 * len(raw)), round(0.2 * len(raw))
    n_train = len(raw) - n_val - n_test
    assert bytes(s.tokens_train.tolist()) == raw[:n_train]
    assert s.x_train.shape == ((n_train - 1) // 16, 16) and s.x_train.dtype == torch.long
    assert torch.equal(s.y_train[:, :-1], s.x_train[:, 1:])  # next-token targets
    assert bytes(s.x_val.flatten().tolist()) == raw[n_train : n_train + len(s.x_val.flatten())]
    assert bytes(s.x_test[0].tolist()) == raw[n_train + n_val : n_train + n_val + 16]


def test_text_errors_name_the_file_or_folder(tmp_path):
    d = _text_dir(tmp_path)
    (d / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"bin.txt is not UTF-8 text .*exclude it"):
        load_dataset("text", str(d))
    assert load_dataset("text", str(d), options={"exclude": ["bin.*"]}).num_classes == 256
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("text", str(d / "nope"))
    with pytest.raises(DataError, match="no file in .* matches pattern '\\*.rst'"):
        load_dataset("text", str(d), options={"pattern": "*.rst"})
    with pytest.raises(DataError, match="fewer than one window"):
        load_dataset("text", str(d / "a.txt"), options={"block_size": 512})
    with pytest.raises(UserError, match="no label_noise"):
        load_dataset("text", str(d), label_noise=0.1)


def test_the_warm_workers_file_cache_reads_a_file_once_and_again_when_it_changes(tmp_path):
    """cache_loaded_files (warm trial workers): a dataset's files are read once, while their size and
    modification time stay; each load gets its own copy; a changed file is read again."""
    from sassha_tune.training.data import cache_loaded_files

    rng = np.random.default_rng(1)
    images = tmp_path / "train-images-idx3-ubyte"  # uncompressed IDX: a rewrite keeps the size

    def write_images(arr):
        images.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", *arr.shape) + arr.astype(np.uint8).tobytes())

    first = rng.integers(0, 256, (20, 28, 28))
    write_images(first)
    for name, arr in (("train-labels-idx1-ubyte", np.arange(20) % 10),
                      ("t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28))),
                      ("t10k-labels-idx1-ubyte", np.arange(5) % 10)):
        (tmp_path / name).write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
                                      + arr.astype(np.uint8).tobytes())
    cache_loaded_files()
    try:
        a = load_dataset("fashion_mnist", str(tmp_path), val_fraction=0.2, options={"normalize": False})
        expected = a.x_train.clone()
        a.x_train.add_(1000.0)  # what a trial does to its data stays with it
        stat = images.stat()
        write_images(255 - first)  # other pixels, same size; the old modification time put back
        os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        b = load_dataset("fashion_mnist", str(tmp_path), val_fraction=0.2, options={"normalize": False})
        assert torch.equal(b.x_train, expected)  # read from the cache, not from the rewritten file
        os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # now it changed
        c = load_dataset("fashion_mnist", str(tmp_path), val_fraction=0.2, options={"normalize": False})
        assert torch.equal(c.x_train, 255.0 - expected)
    finally:
        cache_loaded_files(False)
    write_images(first)  # same size, the same modification time as for the last load
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    d = load_dataset("fashion_mnist", str(tmp_path), val_fraction=0.2, options={"normalize": False})
    assert torch.equal(d.x_train, expected)  # off: every load reads the files
