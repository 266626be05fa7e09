"""Datamodules on small data in the real on-disk formats; bad files are named in the errors."""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import FashionMNISTDataModule, ImageFolderDataModule
from datamodules.fashion_mnist import read_idx
from datamodules.resumable import EpochShuffleSampler
from tests.fixtures import make_fashion_mnist, make_imagefolder, write_idx


def fashion(data_dir, **kwargs) -> FashionMNISTDataModule:
    kwargs = dict(dict(batch_size=8, num_workers=0, val_size=16, search_system=False, download=False), **kwargs)
    module = FashionMNISTDataModule(str(data_dir), **kwargs)
    module.setup("fit")
    return module


def test_idx_round_trip_and_header_checks(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", array, 2051), 2051), array)
    with pytest.raises(ValueError, match="a.gz.*magic 2049"):
        read_idx(tmp_path / "a.gz", 2049)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(ValueError, match="short.gz: truncated"):
        read_idx(tmp_path / "short.gz", 2051)
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="junk.gz: cannot read"):
        read_idx(tmp_path / "junk.gz", 2051)


def test_fashion_mnist_splits_shapes_and_normalisation(fashion_dir):
    module = fashion(fashion_dir, augment=False)
    assert [len(module.splits[s]) for s in ("train", "val", "test")] == [80, 16, 32]
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    test_images, test_labels = next(iter(module.test_dataloader()))
    # the fixture's class-k bar lies at rows 2k+4..2k+5; after normalisation it is the brightest row
    rows = test_images[:, 0, :, 4:24].mean(-1).argmax(-1)
    assert torch.equal(rows // 2 - 2, test_labels)
    assert test_images.max().item() == pytest.approx((250 / 255 - module.mean) / module.std, rel=1e-5)


def test_fashion_mnist_split_is_fixed_and_disjoint(fashion_dir):
    first, second = fashion(fashion_dir), fashion(fashion_dir)
    assert torch.equal(first.splits["val"].images, second.splits["val"].images)
    train, val = first.splits["train"].images.flatten(1), first.splits["val"].images.flatten(1)
    assert len(train) + len(val) == 96
    assert not (val[:, None] == train[None]).all(-1).any()


def test_fashion_mnist_resize_and_torchvision_layout(fashion_dir, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for file in fashion_dir.iterdir():
        (raw / file.name).write_bytes(file.read_bytes())
    module = fashion(tmp_path, image_size=32)
    assert next(iter(module.val_dataloader()))[0].shape == (8, 1, 32, 32)


def test_missing_fashion_mnist_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install dataset-fashion-mnist"):
        fashion(tmp_path / "nowhere")


def test_corrupt_fashion_mnist_file_is_named(tmp_path):
    data = make_fashion_mnist(tmp_path / "bad")
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        fashion(data)


def test_imagefolder_transforms_and_mixup(imagefolder_dir):
    module = ImageFolderDataModule(str(imagefolder_dir), image_size=32, batch_size=4, num_workers=0,
                                   mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    module.setup("fit")
    assert module.num_classes == 2 and module.class_names == ["n01440764", "n01443537"]
    images, targets = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    mixed, soft = module.batch_transform(images, targets)
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(-1), torch.ones(4))
    assert ImageFolderDataModule(str(imagefolder_dir), num_workers=0).batch_transform is None
    images, _ = next(iter(module.test_dataloader()))
    assert images.shape == (4, 3, 32, 32)


def test_imagefolder_errors_name_the_path(tmp_path, imagefolder_dir):
    with pytest.raises(FileNotFoundError, match="nope/train"):
        ImageFolderDataModule(str(tmp_path / "nope"))
    tree = make_imagefolder(tmp_path / "mismatch", splits=("train",))
    make_imagefolder(tree, classes=("n01440764", "n09999999"), splits=("val",))
    with pytest.raises(ValueError, match="n09999999"):
        ImageFolderDataModule(str(tree), num_workers=0).setup("fit")


def test_corrupt_jpeg_is_named(tmp_path):
    tree = make_imagefolder(tmp_path / "corrupt")
    broken = next((tree / "val" / "n01440764").iterdir())
    broken.write_bytes(b"\xff\xd8\xff garbage")
    module = ImageFolderDataModule(str(tree), image_size=32, batch_size=8, num_workers=0)
    module.setup("fit")
    with pytest.raises(OSError, match=broken.name):
        list(module.val_dataloader())


def test_epoch_sampler_order_depends_only_on_seed_and_epoch_and_skips_once():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sorted(index for _, index in keys) == list(range(10)) and {epoch for epoch, _ in keys} == {2}
    other = EpochShuffleSampler(10, seed=3)
    other.set_epoch(2)
    other.skip = 4
    assert list(other) == keys[4:] and list(other) == keys
    other.set_epoch(3)
    assert list(other) != keys


def test_resumable_state_round_trip_skips_finished_batches(fashion_dir):
    module = fashion(fashion_dir, batch_size=8)
    loader = module.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [labels for _, labels in loader]
    module.trainer = SimpleNamespace(num_training_batches=len(full), fit_loop=SimpleNamespace(
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(completed=3)))))
    state = module.state_dict()
    assert state == {"epoch": 1, "samples_done": 24}
    resumed = fashion(fashion_dir, batch_size=8)
    resumed.load_state_dict(state)
    rest = [labels for _, labels in resumed.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:])) and len(rest) == len(full) - 3
    module.trainer.fit_loop.epoch_loop.batch_progress.current.completed = len(full)
    assert module.state_dict() == {"epoch": 2, "samples_done": 0}


def test_augmentation_is_a_function_of_seed_epoch_and_index(fashion_dir):
    dataset = fashion(fashion_dir).splits["train"]
    assert torch.equal(dataset[(1, 5)][0], dataset[(1, 5)][0])
    assert any(not torch.equal(dataset[(1, i)][0], dataset[(2, i)][0]) for i in range(10))
