"""Medical segmentation: decoders, losses, DSC/HD95 conventions, slice-wise inference, data formats, run.py."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("monai")
pytest.importorskip("h5py")
pytest.importorskip("scipy")

import backbones  # noqa: E402
from datamodules.acdc import ACDCDataModule  # noqa: E402
from datamodules.isic import IsicDataModule  # noqa: E402
from datamodules.synapse import SynapseDataModule, transunet_augment  # noqa: E402
from heads.msvmunet import MSVMUNetDecoder  # noqa: E402
from heads.vmunet import VMUNetDecoder, pixel_expand  # noqa: E402
from run import backbone_interface  # noqa: E402
from tasks.losses import DiceCELoss, soft_dice_loss  # noqa: E402
from tasks.medseg import case_metrics, cosine_annealing_epochs, evaluate_case, metrics_table, predict_volume  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.medical_fixtures import make_acdc, make_isic, make_synapse  # noqa: E402


@pytest.fixture(scope="module")
def synapse_dir(tmp_path_factory) -> Path:
    return make_synapse(tmp_path_factory.mktemp("Synapse"))


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build(backbone: str, decoder: type, num_classes: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The backbone built for what ``decoder`` reads and the decoder on it, as run.py composes them."""
    backbone_kwargs, head_kwargs_for = backbone_interface(f"{decoder.__module__}.{decoder.__qualname__}")
    encoder = backbones.create_backbone(backbone, in_chans=3, **backbone_kwargs, **kwargs)
    return encoder, decoder(**head_kwargs_for(encoder), num_classes=num_classes)


# ---------------------------------------------------------------- decoders

def test_pixel_expand_matches_the_reference_channel_order():
    einops = pytest.importorskip("einops")
    x = torch.randn(2, 3, 5, 4 * 6)
    expected = einops.rearrange(x, "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=2, p2=2)
    assert torch.equal(pixel_expand(x, 2), expected)


@pytest.mark.parametrize("decoder", [VMUNetDecoder, MSVMUNetDecoder])
def test_decoders_give_full_resolution_logits_and_gradients(decoder):
    encoder, head = build("test_vmamba", decoder, 5)
    images = torch.randn(2, 3, 64, 64)
    logits = head(encoder(images))
    assert logits.shape == (2, 5, 64, 64)
    logits.mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_vmunet_paper_configuration_has_27_43m_parameters():
    encoder, head = build("vanilla_vmamba_tiny", VMUNetDecoder, 9, depths=[2, 2, 2, 2])
    assert abs(n_params(encoder, head) / 1e6 - 27.43) < 27.43 * 0.005


def test_msvmunet_with_vmamba_tiny_s1l8_has_35_93m_parameters():
    encoder, head = build("vmamba_tiny_s1l8", MSVMUNetDecoder, 9)
    assert abs(n_params(encoder) / 1e6 - 29.48) < 29.48 * 0.005
    assert abs(n_params(head) / 1e6 - 6.45) < 6.45 * 0.005
    assert abs(n_params(encoder, head) / 1e6 - 35.93) < 35.93 * 0.005


def test_vmunet_decoder_blocks_can_start_from_the_mirrored_encoder_blocks():
    encoder, head = build("vanilla_vmamba_tiny", VMUNetDecoder, 2, depths=[2, 2, 2, 2])
    before = head.stages[0].blocks[0].mixer.in_proj.weight.clone()
    copied = head.init_from_encoder(encoder)
    deepest = encoder.model.stages[3].blocks[0]
    assert copied == 2 + 2 + 2 + 1  # every decoder block has a mirrored encoder block of its kind
    assert not torch.equal(before, head.stages[0].blocks[0].mixer.in_proj.weight)
    assert torch.equal(head.stages[0].blocks[0].mixer.in_proj.weight, deepest.mixer.in_proj.weight)
    assert torch.equal(head.stages[3].blocks[0].mixer.ssm.A_logs, encoder.model.stages[0].blocks[0].mixer.ssm.A_logs)
    assert torch.equal(head.stages[2].blocks[1].norm1.weight, encoder.model.stages[1].blocks[1].norm1.weight)


def test_encoder_blocks_of_another_kind_are_not_copied():
    encoder, head = build("test_vmamba", VMUNetDecoder, 2)  # v2 encoder blocks, v0 decoder blocks
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert head.init_from_encoder(encoder) == 0
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_vmunet_decoder_adds_the_stage_inputs_before_expanding_and_refuses_levels_alone():
    encoder, head = build("test_vmamba", VMUNetDecoder, 2)
    head.eval()
    features = encoder(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        logits = head(features)
        moved = head(features[:4] + [features[4], features[5], features[6] + 1.0, features[7]])
        unused = head(features[:3] + [features[3], features[4] + 1.0, *features[5:]])
    # the stride-16 stage input joins the decoder; the stem's output (the first stage's input) does not
    assert (moved - logits).abs().max() > 1e-3 and torch.equal(unused, logits)
    with pytest.raises(ValueError, match="4 level maps followed by their 4 stage inputs .*stage_inputs=True.* got 4"):
        head(features[:4])


def test_decoder_depths_must_match_the_feature_levels():
    with pytest.raises(ValueError, match="depths"):
        VMUNetDecoder([8, 16, 32, 64], [4, 8, 16, 32], 2, depths=[1, 1])
    with pytest.raises(ValueError, match="depths"):
        MSVMUNetDecoder([8, 16, 32, 64], [4, 8, 16, 32], 2, depths=[1, 1, 1, 1])


# ---------------------------------------------------------------- losses

def test_soft_dice_is_zero_for_confident_correct_logits_and_near_one_when_wrong():
    target = torch.tensor([[[0, 1], [2, 2]]])
    right = nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 40
    assert soft_dice_loss(right, target) < 1e-4
    wrong = nn.functional.one_hot((target + 1) % 3, 3).movedim(-1, 1).float() * 40
    assert soft_dice_loss(wrong, target) > 0.99


def test_dice_ce_loss_weights_its_parts_and_handles_a_sigmoid_output():
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    parts = DiceCELoss(0.3, 0.7)(logits, target)
    assert torch.allclose(parts["loss"], 0.3 * parts["ce"] + 0.7 * parts["dice"])
    assert torch.allclose(parts["ce"], nn.functional.cross_entropy(logits, target))
    binary = DiceCELoss(1.0, 1.0)(torch.randn(2, 1, 8, 8), torch.randint(0, 2, (2, 8, 8)))
    assert torch.allclose(binary["loss"], binary["ce"] + binary["dice"])


# ---------------------------------------------------------------- metrics

def points(shape: tuple[int, ...], *coordinates: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for coordinate in coordinates:
        mask[coordinate] = True
    return mask


def test_dsc_and_hd95_of_single_voxels_are_their_euclidean_distance():
    prediction, target = points((10, 10), (0, 0)), points((10, 10), (3, 4))
    assert case_metrics(prediction, target) == (0.0, 5.0, False)
    _, distance, _ = case_metrics(prediction, target, spacing=(2.0, 1.0))
    assert distance == pytest.approx(math.sqrt(6 ** 2 + 4 ** 2))


def test_hd95_respects_anisotropic_voxel_spacing_in_3d():
    prediction, target = points((4, 6, 6), (0, 2, 2)), points((4, 6, 6), (2, 2, 2))
    assert case_metrics(prediction, target, spacing=(2.5, 1.0, 1.0))[1] == pytest.approx(5.0)
    assert case_metrics(prediction, target)[1] == pytest.approx(2.0)


def test_dsc_of_overlapping_squares_and_identical_masks():
    prediction = np.zeros((20, 20), dtype=bool)
    target = prediction.copy()
    prediction[5:10, 5:10] = True  # 25 pixels
    target[5:10, 8:13] = True  # 25 pixels, 10 shared
    dsc, distance, empty = case_metrics(prediction, target)
    assert dsc == pytest.approx(2 * 10 / 50)
    assert distance == pytest.approx(3.0)  # the 5 left-edge pixels of 16 on each outline lie 3 px away
    assert not empty
    assert case_metrics(target, target) == (1.0, 0.0, False)


def test_empty_mask_conventions_follow_transunet():
    empty, square = np.zeros((8, 8), bool), points((8, 8), (2, 2), (2, 3))
    assert case_metrics(empty, square) == (0.0, 0.0, True)  # missed structure
    assert case_metrics(square, empty) == (1.0, 0.0, True)  # structure absent from the label
    assert case_metrics(empty, empty) == (0.0, 0.0, True)  # both empty: TransUNet scores 0


def test_a_single_image_case_uses_its_in_plane_spacing():
    prediction, target = points((1, 10, 10), (0, 0, 0)), points((1, 10, 10), (0, 0, 3))
    assert case_metrics(prediction, target, spacing=(5.0, 1.0, 2.0))[1] == pytest.approx(6.0)


def test_per_case_rows_and_table_report_each_class():
    label = np.zeros((2, 10, 10), dtype=np.int64)
    label[:, 1:4, 1:4], label[:, 6:9, 6:9] = 1, 2
    prediction = label.copy()
    prediction[:, 6:9, 6:9] = 0
    values = evaluate_case(prediction, label, [1, 2])
    assert values.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    table = metrics_table(values[None], ["liver", "spleen"], "voxels")
    assert "liver" in table and "spleen" in table and "paper row" in table
    assert "50.00" in table  # mean DSC over the two classes, in percent
    assert "1 of 2 case-class pairs" in table


# ---------------------------------------------------------------- slice-wise inference

def test_predict_volume_zooms_in_normalises_and_zooms_back():
    volume = np.zeros((3, 40, 30), dtype=np.float32)
    volume[:, 10:30, 5:20] = 1.0
    seen = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape)
        foreground = (batch[:, :1] > 0).float()  # after normalising with mean 0.5, std 0.5 the square is +1
        return torch.cat([1 - foreground, foreground], 1)

    labels = predict_volume(model, volume, (64, 64), mean=(0.5,), std=(0.5,), in_chans=3, batch_size=2)
    assert seen == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert labels.shape == volume.shape
    assert case_metrics(labels == 1, volume > 0)[0] > 0.95


def test_cosine_annealing_epochs_is_stepped_per_epoch_and_periodic_beyond_t_max():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_annealing_epochs(optimizer, total_steps=40, epochs=4, t_max=2, min_lr_ratio=0.1)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == rates[9] == pytest.approx(1.0)  # epoch 0, constant within the epoch
    assert rates[10] == pytest.approx(0.55)  # epoch 1: half way
    assert rates[20] == pytest.approx(0.1)  # epoch 2 = t_max: the floor
    assert rates[30] == pytest.approx(0.55)  # and back up


# ---------------------------------------------------------------- data formats

def test_transunet_augmentation_moves_image_and_label_together():
    label = np.zeros((16, 16), dtype=np.int64)
    label[2:6, 3:11], label[9:14, 1:4] = 1, 2
    for seed in range(12):
        image, moved = transunet_augment(label.astype(np.float32), label, np.random.default_rng(seed))
        assert np.array_equal(image, moved.astype(np.float32))
        assert sorted(np.unique(moved)) == [0, 1, 2]


def test_synapse_module_reads_slices_and_volumes(synapse_dir):
    module = SynapseDataModule(str(synapse_dir), batch_size=2, num_workers=0, img_size=48)
    module.setup()
    assert module.num_classes == 9 and len(module.class_names) == 8
    assert len(module.datasets["train"]) == 6
    sample = module.datasets["train"][(0, 1)]
    assert sample["image"].shape == (3, 48, 48) and sample["label"].shape == (48, 48)
    assert sample["label"].dtype == torch.int64 and int(sample["label"].max()) <= 8
    case = module.datasets["test"][0]
    assert case["image"].shape == case["label"].shape == (3, 32, 32)
    assert case["case"] == "case0001" and case["spacing"] is None
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 48, 48)


def test_synapse_spacing_stored_in_a_volume_is_used(tmp_path):
    import h5py

    root = make_synapse(tmp_path / "Synapse", test_cases=1)
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "a") as volume:
        volume.attrs["spacing"] = [3.0, 0.7, 0.7]
    case = SynapseDataModule(str(root), num_workers=0).load_case(root / "test_vol_h5" / "case0001.npy.h5")
    assert case["spacing"] == (3.0, 0.7, 0.7)


def test_corrupt_npz_and_h5_name_the_file(tmp_path):
    root = make_synapse(tmp_path / "Synapse")
    module = SynapseDataModule(str(root), num_workers=0)
    broken = root / "train_npz" / "case0005_slice000.npz"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(OSError, match="case0005_slice000.npz"):
        module.load_slice(broken)
    volume = root / "test_vol_h5" / "case0001.npy.h5"
    volume.write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match="case0001.npy.h5"):
        module.load_case(volume)


def test_wrong_keys_and_missing_listed_files_are_named(tmp_path):
    root = make_synapse(tmp_path / "Synapse")
    np.savez(root / "train_npz" / "case0005_slice000.npz", img=np.zeros((4, 4)), label=np.zeros((4, 4)))
    with pytest.raises(KeyError, match="expected \\['image', 'label'\\]"):
        SynapseDataModule(str(root), num_workers=0).load_slice(root / "train_npz" / "case0005_slice000.npz")
    (root / "train_npz" / "case0006_slice002.npz").unlink()
    with pytest.raises(FileNotFoundError, match="case0006_slice002.npz"):
        SynapseDataModule(str(root), num_workers=0)


def test_acdc_module_reads_slices_and_volumes(tmp_path):
    root = make_acdc(tmp_path / "ACDC")
    module = ACDCDataModule(str(root), num_workers=0, img_size=32)
    module.setup()
    assert module.class_names == ("RV", "Myo", "LV") and module.num_classes == 4
    assert module.datasets["train"][0]["image"].shape == (3, 32, 32)
    assert module.datasets["val"][0]["image"].shape == (1, 32, 32)  # a validation slice is a case of depth 1
    assert module.datasets["test"][0]["label"].shape == (3, 32, 32)
    on_test = ACDCDataModule(str(root), num_workers=0, val_split="test")
    assert on_test.items["val"] == on_test.items["test"]
    with pytest.raises(ValueError, match="val_split"):
        ACDCDataModule(str(root), val_split="validation")


def test_isic_module_pairs_masks_by_name_and_names_missing_ones(tmp_path):
    root = make_isic(tmp_path / "isic2018")
    module = IsicDataModule(str(root), num_workers=0, img_size=32)
    module.setup()
    sample = module.datasets["train"][(0, 0)]
    assert sample["image"].shape == (3, 32, 32) and float(sample["image"].max()) <= 255.0
    assert set(sample["label"].unique().tolist()) <= {0, 1}
    case = module.datasets["val"][0]
    assert case["image"].shape == (1, 3, 32, 32) and case["label"].shape == (1, 32, 32)
    (root / "val" / "masks" / "ISIC_0000004_segmentation.png").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_0000004"):
        IsicDataModule(str(root), num_workers=0)


def test_brain_demo_data_comes_from_the_installed_nilearn_template():
    pytest.importorskip("nibabel")
    pytest.importorskip("nilearn")
    from datamodules.brain import BrainTissueDataModule

    module = BrainTissueDataModule(num_workers=0)
    assert module.volume.shape == module.label.shape and module.spacing == (1.0, 1.0, 1.0)
    assert set(np.unique(module.label)) == {0, 1, 2}
    held_out = {z for start, stop in module.items["val"] + module.items["test"] for z in range(start, stop)}
    assert held_out and not held_out & set(module.items["train"])


# ---------------------------------------------------------------- training

def test_encoder_stays_fixed_during_the_frozen_epochs(synapse_dir, tmp_path):
    import lightning.pytorch as pl

    from tasks.medseg import MedicalSegmentationTask

    module = SynapseDataModule(str(synapse_dir), batch_size=2, num_workers=0, img_size=32)
    encoder, head = build("test_vmamba", MSVMUNetDecoder, 9)
    task = MedicalSegmentationTask(encoder, head, partial(torch.optim.AdamW, lr=1e-2), 9, freeze_encoder_epochs=1,
                                   img_size=module.img_size, mean=module.mean, std=module.std, in_chans=module.in_chans)

    def state(model: nn.Module) -> dict:
        return {k: v.clone() for k, v in model.state_dict().items()}

    snapshots = [(state(encoder), state(head))]

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            snapshots.append((state(pl_module.backbone), state(pl_module.head)))

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Snapshot()], default_root_dir=tmp_path)
    trainer.fit(task, datamodule=module)

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    (encoder_0, head_0), (encoder_1, head_1), (encoder_2, _) = snapshots
    assert same(encoder_0, encoder_1) and not same(head_0, head_1)  # epoch 0: only the decoder learns
    assert not same(encoder_1, encoder_2)  # epoch 1: the encoder too


# ---------------------------------------------------------------- end to end

def test_fast_dev_run_on_synapse_prints_the_per_organ_table(synapse_dir, tmp_path):
    result = run_cli(["experiment=synapse_msvmunet_vmamba_tiny", f"data.root={synapse_dir}",
                      "trainer.fast_dev_run=true", "backbone=test_vmamba", "data.img_size=32", "data.batch_size=2",
                      "data.num_workers=0", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for organ in ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"):
        assert organ in output
    assert "HD95 (voxels)" in output and "paper row" in output
    assert (tmp_path / "run" / "medseg_test.txt").is_file()
    assert list((tmp_path / "run" / "overlays").glob("test_*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment, make, extra", [
    ("synapse_vmunet", make_synapse, ["head.depths=[1,1,1,1]"]),
    ("acdc_msvmunet_vmamba_tiny", make_acdc, []),
    ("isic18_vmunet", make_isic, ["head.depths=[1,1,1,1]"]),
])
def test_fast_dev_run_of_the_other_medical_experiments(experiment, make, extra, tmp_path):
    root = make(tmp_path / "data")
    result = run_cli([f"experiment={experiment}", f"data.root={root}", "trainer.fast_dev_run=true",
                      "backbone=test_vmamba", "data.img_size=32", "data.batch_size=2",
                      "data.num_workers=0", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}", *extra],
                     cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "paper row" in output and "test/DSC" in output
    if experiment.startswith("isic"):
        assert "lesion" in output and "test/sensitivity" in output


@pytest.mark.slow
def test_brain_demo_learns_tissue_classes_in_a_short_run(tmp_path):
    pytest.importorskip("nibabel")
    pytest.importorskip("nilearn")
    result = run_cli(["experiment=demo_medical_brain", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2",
                      "data.train_repeats=1", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    dsc = float(output.split("test/DSC = ")[1].split()[0])
    assert dsc > 0.3  # a constant prediction scores 0 on both tissue classes; 2 epochs reach 0.45-0.6
    assert list((tmp_path / "run" / "overlays").glob("test_*.png"))
