"""The parts the Lightning module composes: labels, objective, metrics; and the checkpoints of
version 0.1 (the losses' state_dict keys moved under ``objective``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lovasz_monai.evaluation import SegmentationMetrics
from lovasz_monai.labels import IGNORED, LabelSemantics
from lovasz_monai.losses import LovaszCELoss
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.objective import ScheduledLoss


@pytest.mark.parametrize(
    ("args", "mode", "out_channels", "counted"),
    [
        ((3,), "multiclass", 3, [1, 2]),
        ((2, 1), "binary", 1, [1]),
        ((3, None, True), "multilabel", 3, [0, 1, 2]),
        ((1,), "multiclass", 1, [0]),
    ],
)
def test_label_semantics_from_outputs(args, mode, out_channels, counted):
    labels = LabelSemantics.from_outputs(*args)
    assert (labels.mode, labels.out_channels, labels.counted_classes) == (
        mode,
        out_channels,
        counted,
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [((0,), "num_classes"), ((3, 2), "out_channels"), ((3, None, False, ["a"]), "class_names")],
)
def test_label_semantics_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        LabelSemantics.from_outputs(*args)
    with pytest.raises(ValueError, match="binary"):
        LabelSemantics(("a", "b", "c"), "binary")


def test_discretize_and_metric_target_of_each_mode():
    logits = torch.tensor([[[-1.0, 2.0, 0.5]], [[1.0, -2.0, 0.0]]])[None]  # (1, 2, 1, 3)
    label = torch.tensor([[[[0, 1, 1]], [[1, 0, 1]]]])
    mask = torch.tensor([[[[1, 1, 0]]]])
    multiclass = LabelSemantics(("bg", "fg"))
    assert multiclass.discretize(logits).tolist() == [[[[1, 0, 0]]]]
    assert multiclass.metric_target(label[:, :1], mask).tolist() == [[[0, 1, IGNORED]]]
    regions = LabelSemantics(("a", "b"), "multilabel")
    assert regions.discretize(logits).tolist() == [[[[0, 1, 1]], [[1, 0, 0]]]]
    assert regions.metric_target(label, mask).tolist() == [[[[0, 1, IGNORED]], [[1, 0, IGNORED]]]]


def test_mean_over_counted_classes_ignores_nan_and_is_nan_when_nothing_counts():
    labels = LabelSemantics(("bg", "a", "b"))
    assert labels.mean(torch.tensor([0.1, 0.5, math.nan])).item() == pytest.approx(0.5)
    assert math.isnan(labels.mean(torch.tensor([0.1, math.nan, math.nan])).item())


def test_scheduled_loss_mixes_and_skips_unweighted_terms():
    calls = []

    class Spy(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, logits, label, mask=None):
            calls.append(self.value)
            return torch.tensor(self.value)

    schedule = ScheduledLoss(Spy(1.0), Spy(3.0), warmup_epochs=1, ramp_epochs=1)
    logits, label, mask = torch.zeros(1, 2, 4), torch.zeros(1, 1, 4), torch.ones(1, 1, 4)
    assert schedule(logits, label, mask, epoch=0).item() == 3.0 and calls == [3.0]
    assert schedule(logits, label, mask, epoch=1).item() == pytest.approx(2.0)
    calls.clear()
    assert schedule(logits, label, mask, epoch=5).item() == 1.0 and calls == [1.0]
    assert schedule(logits, label, mask).item() == 1.0  # evaluation: the loss alone
    with pytest.raises(ValueError, match="warmup_loss"):
        ScheduledLoss(Spy(1.0), warmup_epochs=2)


def test_segmentation_metrics_equal_the_module_metrics_and_reset():
    labels = LabelSemantics(("bg", "a", "b"))
    metrics = SegmentationMetrics(labels)
    logits = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(label)
    metrics.update(logits, label, mask)
    evaluation = metrics.compute()
    pred, target = logits.argmax(1), label[:, 0]
    for c in range(3):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        assert evaluation.iou[c].item() == pytest.approx(inter / union)
    assert evaluation.miou.item() == pytest.approx(evaluation.iou[1:].mean().item())
    assert not metrics.updated and len(metrics.cases) == 0


def test_checkpoint_state_of_version_0_1_loads():
    def model():
        return LovaszSegmentationModule(
            3,
            loss=LovaszCELoss(to_onehot_y=True, weight=[1.0, 2.0, 3.0]),
            unet_channels=(4, 8),
            unet_strides=(2,),
        )

    state = model().state_dict()
    assert "objective.loss.lovasz.class_weight" in state
    former = {k.replace("objective.loss.lovasz.", "loss."): v for k, v in state.items()}
    former["loss.class_weight"] = torch.tensor([3.0, 2.0, 1.0])
    loaded = model()
    loaded.load_state_dict(former)
    assert loaded.loss.class_weight.tolist() == [3.0, 2.0, 1.0]


def test_setting_the_losses_of_the_module_sets_the_objective():
    module = LovaszSegmentationModule(
        3,
        warmup_loss=nn.CrossEntropyLoss(),
        warmup_epochs=1,
        unet_channels=(4, 8),
        unet_strides=(2,),
    )
    module.warmup_loss = None
    assert module.objective.warmup_loss is None and module.lovasz_weight(0) == 1.0
    replacement = nn.CrossEntropyLoss()
    module.loss = replacement
    assert module.objective.loss is replacement and "loss" not in module._modules


def test_modules_from_config_moved_with_a_warning():
    import lovasz_monai.module as module
    from lovasz_monai import hparams

    with pytest.warns(DeprecationWarning, match="lovasz_monai.hparams"):
        assert module.modules_from_config is hparams.modules_from_config


def test_python_objects_stay_out_of_the_hparams_unless_given_by_config():
    from lovasz_monai.hparams import modules_from_config

    def tiny(**kwargs):
        return LovaszSegmentationModule(3, unet_channels=(4, 8), unet_strides=(2,), **kwargs)

    assert "loss" not in tiny(loss=nn.CrossEntropyLoss()).hparams
    with modules_from_config():
        assert "loss" in tiny(loss=nn.CrossEntropyLoss()).hparams
    assert tiny().hparams["num_classes"] == 3


def test_unet_settings_with_a_network_warn_that_they_are_ignored():
    with pytest.warns(UserWarning, match="ignored with the given network"):
        LovaszSegmentationModule(3, network=nn.Conv3d(1, 3, 1), unet_channels=(4, 8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LovaszSegmentationModule(3, network=nn.Conv3d(1, 3, 1))  # the defaults: no warning
