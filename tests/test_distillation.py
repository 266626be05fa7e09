"""DeiT-style distillation in the classification task: the loss mixes labels and teacher, eval averages heads."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the test backbones)
from heads import LinearClassifier
from tasks import ClassificationTask


def make_task(teacher: torch.nn.Module | None, **kwargs) -> ClassificationTask:
    backbone = timm.create_model("test_vmamba", num_classes=0)
    head = LinearClassifier(backbone.num_features, 4)
    return ClassificationTask(backbone, head, partial(torch.optim.SGD, lr=0.1), num_classes=4, teacher=teacher,
                              **kwargs)


def test_hard_distillation_loss_mixes_labels_and_teacher_argmax():
    torch.manual_seed(0)
    teacher = timm.create_model("test_groupmamba", num_classes=4, distilled=False).eval()
    task = make_task(teacher, distill_alpha=0.3, label_smoothing=0.1).eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    features = task.backbone(images)
    teacher_labels = teacher(images).argmax(-1)
    expected = (0.7 * F.cross_entropy(task.head(features), labels, label_smoothing=0.1)
                + 0.3 * F.cross_entropy(task.dist_head(features), teacher_labels))
    assert torch.allclose(task.training_loss(images, labels), expected, atol=1e-6)


def test_training_step_trains_both_heads_but_never_the_teacher():
    torch.manual_seed(0)
    teacher = timm.create_model("test_vmamba", num_classes=4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = make_task(teacher)
    optimizer = task.configure_optimizers()["optimizer"]
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in task.dist_head.parameters())
    assert not any(id(p) in trained for p in teacher.parameters())
    task.train()
    assert not teacher.training, "the teacher stays in eval mode (BatchNorm statistics frozen)"
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    task.training_loss(images, labels).backward()
    optimizer.step()
    assert task.dist_head.fc.weight.grad is not None
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_eval_logits_are_the_mean_of_both_heads():
    task = make_task(timm.create_model("test_vmamba", num_classes=4)).eval()
    images = torch.randn(2, 3, 32, 32)
    features = task.backbone(images)
    assert torch.allclose(task(images), (task.head(features) + task.dist_head(features)) / 2)
    assert not torch.allclose(task.head.fc.weight, task.dist_head.fc.weight)


def test_soft_distillation_is_zero_when_student_matches_teacher():
    task = make_task(timm.create_model("test_vmamba", num_classes=4), distill_type="soft", distill_tau=2.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert task._distillation_loss(images, task.teacher(images)).abs() < 1e-6


def test_bad_distillation_settings_are_named():
    with pytest.raises(ValueError, match="distill_type"):
        make_task(timm.create_model("test_vmamba", num_classes=4), distill_type="medium")
    task = make_task(timm.create_model("test_vmamba", num_classes=7))
    with pytest.raises(ValueError, match="num_classes=4"):
        task._distillation_loss(torch.randn(1, 3, 32, 32), torch.zeros(1, 4))
