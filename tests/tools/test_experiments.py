"""Tests of lovasz_monai.experiments: aggregation, evaluation, the report, and a tiny `compare`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from lovasz_monai.losses import MaskedDiceCELoss
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.tools import runs
from lovasz_monai.tools.experiments import compare, main, run_order
from lovasz_monai.tools.recipes import LOSSES, schedule_epochs
from lovasz_monai.tools.report import (
    ComparisonResult,
    RunResult,
    aggregate,
    format_mean_std,
    markdown_table,
    merge_results,
    plot_comparison,
    report,
    write_results,
)
from lovasz_monai.tools.runs import (
    EpochCheckpoint,
    EvaluationCache,
    cli_args,
    cosine_t_max,
    evaluate,
    run_one,
    training_finished,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- aggregation ---------------------------------------------------------------------------------


def test_aggregate_mean_and_sample_std():
    mean, std = aggregate([0.60, 0.70, 0.80, 0.90])
    assert mean == pytest.approx(0.75)
    # sample std (ddof=1): sqrt(((.15^2 + .05^2) * 2) / 3)
    assert std == pytest.approx(math.sqrt((0.15**2 + 0.05**2) * 2 / 3))
    assert aggregate([0.25, 0.75]) == pytest.approx((0.5, math.sqrt(0.125)))


def test_aggregate_nan_single_and_empty():
    assert aggregate([0.4, math.nan, 0.6]) == pytest.approx((0.5, math.sqrt(0.02)))
    assert aggregate([0.3]) == (0.3, 0.0)
    mean, std = aggregate([math.nan])
    assert math.isnan(mean) and math.isnan(std)
    assert math.isnan(aggregate([])[0])


def test_format_mean_std():
    assert format_mean_std([0.5, 0.7, 0.9]) == "0.700 ± 0.200"
    assert format_mean_std([0.12345], digits=2) == "0.12 ± 0.00"
    assert format_mean_std([math.nan, math.nan]) == "n/a"


def test_aggregate_infinite_values():
    """An infinite value (HD95 of a missed structure) gives an infinite mean and, among
    several values, an undefined std; ``inf`` with ``-inf`` an undefined mean."""
    inf = math.inf
    mean, std = aggregate([inf, 1.0])
    assert mean == inf and math.isnan(std)
    assert aggregate([-inf, 2.0, math.nan])[0] == -inf
    assert all(math.isnan(v) for v in aggregate([inf, -inf]))
    assert aggregate([inf]) == (inf, 0.0)  # one value: std 0, as for finite ones
    assert format_mean_std([inf, 1.0]) == "inf ± n/a"
    assert format_mean_std([inf, inf]) == "inf ± n/a"
    assert format_mean_std([inf, -inf]) == "n/a"
    assert format_mean_std([inf], digits=1) == "inf ± 0.0"
    with pytest.raises(ValueError, match="digits must be >= 0"):
        format_mean_std([0.5], digits=-1)


def test_run_order_rotates_losses_per_seed():
    order = run_order(["a", "b", "c"], [0, 1, 2, 3])
    assert order[:3] == [(0, "a"), (0, "b"), (0, "c")]
    assert order[3:6] == [(1, "b"), (1, "c"), (1, "a")]
    assert order[6:9] == [(2, "c"), (2, "a"), (2, "b")]
    assert sorted(order) == sorted((s, loss) for s in range(4) for loss in "abc")


def test_compare_refuses_repeated_losses_and_seeds(capsys):
    """A loss or seed given twice would train the same run twice and count it as two seeds:
    refused before anything is trained."""
    with pytest.raises(ValueError, match=r"repeated seeds \[0\]: every \(loss, seed\) run"):
        compare(DEMO, losses=["ce"], seeds=[0, 1, 0], output=None)
    with pytest.raises(ValueError, match=r"repeated losses \['ce'\]"):
        compare(DEMO, losses=["ce", "lovasz", "ce"], seeds=[0], output=None)
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(DEMO), "--losses", "ce", "ce", "--seeds", "2", "2"])
    error = capsys.readouterr().err
    assert "repeated --losses ['ce']: every (loss, seed) run is trained once" in error
    assert "; repeated --seeds [2]: every" in error


def test_schedule_epochs_defaults_and_overrides():
    assert schedule_epochs(20) == (10, 3)
    assert schedule_epochs(2) == (1, 0)
    assert schedule_epochs(20, 5, 1) == (5, 1)


# -- CLI arguments ---------------------------------------------------------------------------------


def _value(args: list[str], key: str) -> str:
    """The last value given for ``key``: the one the parser keeps."""
    for i in range(len(args) - 1, -1, -1):
        if args[i] == key:
            return args[i + 1]
        if args[i].startswith(key + "="):
            return args[i].split("=", 1)[1]
    raise KeyError(key)


def test_cli_args_keep_the_ratio_of_t_max_to_the_epochs(tmp_path):
    """A schedule set to stop early (T_max 79 for 63 epochs) stays early at any length; one that
    ends with the training still does; a non-cosine scheduler gets no T_max."""
    subcortical = ROOT / "configs" / "subcortical.yaml"
    assert (
        _value(cli_args(subcortical, "dicece", 0, 63, "runs/x"), "--lr_scheduler.init_args.T_max")
        == "79"
    )
    assert (
        _value(cli_args(subcortical, "dicece", 0, 20, "runs/x"), "--lr_scheduler.init_args.T_max")
        == "25"
    )
    assert _value(cli_args(DEMO, "dicece", 0, 7, "runs/x"), "--lr_scheduler.init_args.T_max") == "7"
    step = tmp_path / "step.yaml"
    step.write_text(
        "trainer: {max_epochs: 10}\nlr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR}"
    )
    assert "--lr_scheduler.init_args.T_max" not in cli_args(step, "dicece", 0, 5, "runs/x")
    # a cosine config without T_max or max_epochs: the schedule ends with the run
    assert cosine_t_max({"lr_scheduler": {"class_path": "CosineAnnealingLR"}}, 9) == 9


def test_atlas_configs_end_at_a_tenth_of_the_peak_learning_rate():
    """The schedule the pipeline ablation chose: after max_epochs the cosine learning rate is
    ~10% of its peak (0.5 * (1 + cos(pi * 63 / 79)) = 0.098), computed by torch itself."""
    import yaml

    for task in ("subcortical", "parcellation"):
        config = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())
        epochs = config["trainer"]["max_epochs"]
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, **config["lr_scheduler"]["init_args"]
        )
        for _ in range(epochs):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.098, abs=0.002), task


def test_cli_args_per_loss():
    args = cli_args(DEMO, "ce_to_lovasz", 3, 12, "runs/x", overrides=["--data.num_samples", "1"])
    assert args[:4] == ["--config", str(DEMO), "--data.num_samples", "1"]
    assert _value(args, "--seed_everything") == "3"
    assert _value(args, "--trainer.max_epochs") == "12"
    assert _value(args, "--lr_scheduler.init_args.T_max") == "12"  # the demo uses cosine
    assert (
        json.loads(_value(args, "--model.loss"))["class_path"] == "lovasz_monai.LovaszSoftmaxLoss"
    )
    warm = json.loads(_value(args, "--model.warmup_loss"))
    assert warm == {"class_path": "torch.nn.CrossEntropyLoss"}
    assert (_value(args, "--model.warmup_epochs"), _value(args, "--model.ramp_epochs")) == (
        "6",
        "2",
    )

    plain = cli_args(DEMO, "lovasz_ce", 0, 4, "runs/y")
    assert json.loads(_value(plain, "--model.loss"))["class_path"] == "lovasz_monai.LovaszCELoss"
    assert _value(plain, "--model.warmup_loss") == "null"
    with pytest.raises(KeyError, match="unknown loss"):
        cli_args(DEMO, "focal", 0, 1, "runs/z")


def test_a_recipe_replaces_the_config_loss_entirely(monkeypatch, tmp_path):
    """``configs/demo_ddp.yaml`` sets ``LovaszCELoss(batch=True, distributed=True, ...)``; a
    recipe's loss must not inherit those settings (jsonargparse keeps the init_args that a new
    class_path also accepts unless the value is reset first)."""
    from lovasz_monai.cli import LovaszCLI

    monkeypatch.setattr(sys, "argv", ["lovasz-monai"])
    data = ["--data.synthetic_kwargs.num_cases=2", "--data.synthetic_kwargs.size=[16,16,16]"]
    single = ["--trainer.devices=1", "--trainer.strategy=auto", *data]
    single.append(f"--data.data_dir={tmp_path / 'data'}")
    for loss, batch, distributed in [
        ("lovasz_hist", False, False),
        ("lovasz_hist_batch", True, False),
        ("lovasz_hist_global", True, True),
    ]:
        args = cli_args(ROOT / "configs" / "demo_ddp.yaml", loss, 0, 1, tmp_path / loss, single)
        model = LovaszCLI(args=args, run=False).model
        assert type(model.loss).__name__ == "LovaszSoftmaxLoss"
        assert (model.loss.batch, model.loss.distributed) == (batch, distributed), loss
        assert model.loss.method == "histogram"


def test_every_loss_builds_through_the_cli_parser():
    """Each registered loss's class_path config instantiates (no training)."""
    from jsonargparse import ArgumentParser
    from torch import nn

    parser = ArgumentParser()
    parser.add_argument("--loss", type=nn.Module)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    for name, spec in LOSSES.items():
        model = spec.model(4, 2, 1)
        for key in ("loss", "warmup_loss"):
            if model.get(key) is None:
                continue
            namespace = parser.parse_args(["--loss", json.dumps(model[key])])
            assert isinstance(instantiate(namespace).loss, nn.Module), (name, key)
    warmup = LOSSES["dicece_to_lovasz_ce"].model(12, 6, 2)
    assert warmup["warmup_loss"]["class_path"].endswith("MaskedDiceCELoss")
    assert (warmup["warmup_epochs"], warmup["ramp_epochs"]) == (6, 2)
    assert warmup["loss"]["init_args"]["lambda_ce"] == 0.3


# -- MaskedDiceCELoss ------------------------------------------------------------------------------


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 7, 8, generator=g)
    labels = torch.randint(0, 3, (2, 1, 6, 7, 8), generator=g)
    return logits, labels


def test_masked_dice_ce_equals_monai_without_mask():
    logits, labels = _tensors()
    reference = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    ours = MaskedDiceCELoss()
    assert torch.allclose(ours(logits, labels), reference, atol=1e-6)
    assert torch.allclose(ours(logits, labels, mask=torch.ones_like(labels)), reference, atol=1e-6)
    weighted = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.3, lambda_ce=2.0)
    assert torch.allclose(
        MaskedDiceCELoss(0.3, 2.0)(logits, labels), weighted(logits, labels), atol=1e-6
    )


def test_masked_dice_ce_ignores_masked_voxels():
    logits, labels = _tensors(1)
    mask = torch.ones_like(labels)
    mask[..., 5:] = 0  # the last 3 slices take part in nothing
    x = logits.clone().requires_grad_()
    value = MaskedDiceCELoss()(x, labels, mask=mask)
    value.backward()
    assert (x.grad[..., 5:] == 0).all() and x.grad[..., :5].abs().sum() > 0
    # the same loss as MONAI's on the volume cut down to the valid voxels
    cropped = DiceCELoss(to_onehot_y=True, softmax=True)(logits[..., :5], labels[..., :5])
    assert torch.allclose(value, cropped, atol=1e-6)
    # whatever the labels and logits say there
    other = labels.clone()
    other[..., 5:] = 2
    assert torch.allclose(MaskedDiceCELoss()(logits, other, mask=mask), value, atol=1e-6)


def test_masked_dice_ce_one_hot_target_and_errors():
    logits, labels = _tensors(2)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    loss = MaskedDiceCELoss()
    assert torch.allclose(loss(logits, onehot), loss(logits, labels), atol=1e-6)
    with pytest.raises(
        ValueError, match=r"one-hot target \(2, 3, 6, 7, 8\), got shape \(2, 2, 6, 7, 8\)"
    ):
        loss(logits, onehot[:, :2])
    with pytest.raises(ValueError, match="C >= 2"):
        loss(logits[:, :1], labels)
    with pytest.raises(ValueError, match=">= 0"):
        MaskedDiceCELoss(lambda_ce=-1)


def test_masked_dice_ce_weighted_cross_entropy():
    """``ce_weight``: the CE term is torch's weighted mean (an independent oracle), the Dice term
    is unchanged; with a mask, the weighted mean over the valid voxels."""
    logits, labels = _tensors(3)
    weight = [0.2, 1.0, 3.0]
    dice_only = MaskedDiceCELoss(lambda_ce=0.0)(logits, labels)
    expected_ce = torch.nn.functional.cross_entropy(
        logits, labels[:, 0], weight=torch.tensor(weight)
    )
    got = MaskedDiceCELoss(lambda_dice=0.0, ce_weight=weight)(logits, labels)
    torch.testing.assert_close(got, expected_ce)
    torch.testing.assert_close(
        MaskedDiceCELoss(ce_weight=weight)(logits, labels), dice_only + expected_ce
    )
    mask = torch.ones_like(labels)
    mask[..., :3] = 0
    masked = MaskedDiceCELoss(lambda_dice=0.0, ce_weight=weight)(logits, labels, mask=mask)
    cropped = torch.nn.functional.cross_entropy(
        logits[..., 3:], labels[:, 0, ..., 3:], weight=torch.tensor(weight)
    )
    torch.testing.assert_close(masked, cropped)
    with pytest.raises(ValueError, match=r"one value per input channel \(3\), got 2"):
        MaskedDiceCELoss(ce_weight=[1.0, 2.0])(logits, labels)
    with pytest.raises(ValueError, match="ce_weight"):
        MaskedDiceCELoss(ce_weight=[1.0, -1.0, 1.0])


def test_weighted_sum_loss_adds_its_terms():
    from lovasz_monai.losses import LovaszSoftmaxLoss, WeightedSumLoss

    logits, labels = _tensors(4)
    mask = torch.ones_like(labels)
    mask[..., 6:] = 0
    dice_ce, lovasz = MaskedDiceCELoss(), LovaszSoftmaxLoss(to_onehot_y=True)
    three = WeightedSumLoss([dice_ce, lovasz], weights=[1.0, 0.5])
    x = logits.clone().requires_grad_()
    value = three(x, labels, mask=mask)
    expected = dice_ce(logits, labels, mask=mask) + 0.5 * lovasz(logits, labels, mask=mask)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert (x.grad[..., 6:] == 0).all()  # the mask reached every term
    assert WeightedSumLoss([dice_ce, lovasz], [0.0, 1.0])(logits, labels) == lovasz(logits, labels)
    for bad, error in [
        (([],), "at least one"),
        (([dice_ce], [1.0, 1.0]), "2 weights for 1 terms"),
        (([dice_ce], [-1.0]), ">= 0"),
        (([dice_ce], [0.0]), "not all 0"),
        (([dice_ce], [float("nan")]), "finite"),
    ]:
        with pytest.raises(ValueError, match=error):
            WeightedSumLoss(*bad)
    with pytest.raises(TypeError, match="CrossEntropyLoss.forward takes no mask"):
        WeightedSumLoss([torch.nn.CrossEntropyLoss()])
    with pytest.raises(TypeError, match="nn.Module"):
        WeightedSumLoss([lambda x, y, mask=None: x.sum()])


def test_inverse_frequency_weights_by_hand(tmp_path):
    """Two label volumes of 96 voxels written here: counts 0 -> 66 + 84, 1 -> 30, 2 -> 6, 3 -> 0
    (6 voxels of ignore 255 left out); 1/f is 1 : 5 : 25, scaled to mean 1 over the 3 classes
    that occur, and 0 for the absent one."""
    import nibabel as nib

    from lovasz_monai.tools.recipes import inverse_frequency_weights

    volumes = [np.zeros((4, 4, 6), np.uint8), np.zeros((4, 4, 6), np.uint8)]
    volumes[0].flat[:30] = 1
    volumes[1].flat[:6] = 2
    volumes[1].flat[6:12] = 255
    cases = []
    for i, volume in enumerate(volumes):
        for kind, data in (("image", volume.astype(np.float32)), ("label", volume)):
            nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{kind}{i}.nii.gz")
        cases.append({"image": f"image{i}.nii.gz", "label": f"label{i}.nii.gz"})
    labels = {"0": "background", "1": "a", "2": "b", "3": "c", "255": "ignore"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "training": cases}))
    expected = [3 / 31, 15 / 31, 75 / 31, 0.0]
    np.testing.assert_allclose(inverse_frequency_weights(tmp_path), expected, rtol=1e-12)

    args = cli_args(DEMO, "lovasz_ce_invfreq", 0, 1, "runs/w", ["--data.data_dir", str(tmp_path)])
    init = json.loads(_value(args, "--model.loss"))["init_args"]
    np.testing.assert_allclose(init["weight"], expected)
    assert init["ce_weight"] == init["weight"] and init["lambda_ce"] == 0.3
    args = cli_args(DEMO, "dicece_invfreq", 0, 1, "runs/w", [f"--data.data_dir={tmp_path}"])
    assert "weight" not in json.loads(_value(args, "--model.loss"))["init_args"]
    np.testing.assert_allclose(
        json.loads(_value(args, "--model.loss"))["init_args"]["ce_weight"], expected
    )


# -- evaluate ----------------------------------------------------------------------------------


def _fixed_model(logits: list[torch.Tensor], **kwargs) -> LovaszSegmentationModule:
    """A real module whose sliding window returns the given logits, one batch after the other
    (the foreground classes count in the means)."""
    model = LovaszSegmentationModule(logits[0].shape[1], network=torch.nn.Identity(), **kwargs)
    outputs = iter(logits)
    model.sliding_window = lambda image: next(outputs)
    model.train()
    return model


def test_evaluate_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    batches, logits, preds = [], [], []
    for _ in range(2):  # two volumes, batch size 1
        label = torch.randint(0, 3, (1, 1, 5, 5, 5), generator=g)
        mask = (torch.rand(1, 1, 5, 5, 5, generator=g) > 0.2).float()
        out = torch.randn(1, 3, 5, 5, 5, generator=g)
        batches.append({"image": torch.zeros(1, 1, 5, 5, 5), "label": label.float(), "mask": mask})
        logits.append(out)
        preds.append(out.argmax(1)[0].numpy())
    model = _fixed_model(logits)
    result = evaluate(model, batches)
    assert model.training  # restored

    labels = [b["label"][0, 0].long().numpy() for b in batches]
    valid = [b["mask"][0, 0].numpy() > 0 for b in batches]
    iou, dice = [], []
    for c in range(3):
        tp = sum(
            ((p == c) & (t == c) & v).sum() for p, t, v in zip(preds, labels, valid, strict=True)
        )
        union = sum(
            (((p == c) | (t == c)) & v).sum() for p, t, v in zip(preds, labels, valid, strict=True)
        )
        iou.append(tp / union)
        per_volume = []
        for p, t, v in zip(preds, labels, valid, strict=True):
            inter, size = (
                ((p == c) & (t == c) & v).sum(),
                ((p == c) & v).sum() + ((t == c) & v).sum(),
            )
            per_volume.append(2 * inter / size)
        dice.append(np.mean(per_volume))
    assert result["iou"] == pytest.approx(iou)
    assert result["dice"] == pytest.approx(dice)
    assert result["miou"] == pytest.approx(np.mean(iou[1:]), abs=1e-6)
    assert result["dice_mean"] == pytest.approx(np.mean(dice[1:]), abs=1e-6)
    assert result["num_volumes"] == 2
    # per case: each volume's IoU per class, its mean over the foreground, then over volumes
    case_iou = [
        [((p == c) & (t == c) & v).sum() / (((p == c) | (t == c)) & v).sum() for c in range(3)]
        for p, t, v in zip(preds, labels, valid, strict=True)
    ]
    assert result["case_iou"] == pytest.approx(np.mean(case_iou, axis=0).tolist())
    expected = np.mean([np.mean(per_class[1:]) for per_class in case_iou])
    assert result["case_miou"] == pytest.approx(expected, abs=1e-6)
    assert result["case_miou"] != pytest.approx(result["miou"], abs=1e-6)  # not dataset-level


def test_evaluate_surface_metrics_in_mm():
    """With the module's ``surface_metrics``, ``case_hd95`` is MONAI's HD95 of each foreground
    class (in mm of the image's affine), averaged per case then over cases; per-case Dice too."""
    from monai.data import MetaTensor
    from monai.metrics import compute_hausdorff_distance

    label = torch.zeros(1, 1, 12, 12, 12)
    label[..., 2:7, 2:7, 2:7] = 1
    label[..., 7:11, 6:11, 5:9] = 2
    pred = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    pred[..., 3:8, 2:7, 2:6] = 1
    pred[..., 7:10, 6:11, 5:10] = 2
    logits = torch.nn.functional.one_hot(pred, 3).movedim(-1, 1).float()
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0]))
    image = MetaTensor(torch.zeros(1, 1, 12, 12, 12), affine=affine)
    batch = {"image": image, "label": label, "mask": torch.ones_like(label)}
    model = _fixed_model([logits], surface_metrics=True)
    result = evaluate(model, [batch])
    onehot = lambda x: torch.nn.functional.one_hot(x.long(), 3).movedim(-1, 1)  # noqa: E731
    hd95 = compute_hausdorff_distance(
        onehot(pred), onehot(label[:, 0]), include_background=True, percentile=95,
        spacing=(2.0, 1.0, 1.5),
    )[0]  # fmt: skip
    assert result["case_hd95"] == pytest.approx(float(hd95[1:].mean()), rel=1e-5)
    assert result["case_hd95"] != pytest.approx(
        float(compute_hausdorff_distance(onehot(pred), onehot(label[:, 0]),
                                         include_background=True, percentile=95)[0][1:].mean()),
        rel=1e-3,
    )  # fmt: skip
    truth = label[:, 0]
    dice = [
        2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum())
        for c in (1, 2)
    ]
    assert result["case_dice"] == pytest.approx(float(np.mean(dice)), rel=1e-6)


def test_evaluate_hd95_over_found_structures_and_one_sided_count():
    """One-sided structures in both directions: class 2 missed in the second volume, class 3
    (absent from the label) predicted in the first. The per-case HD95 is inf;
    ``case_hd95_found`` averages each volume over the structures in both label and prediction
    (MONAI's HD95 as the oracle) and ``hd95_one_sided`` counts the 2 pairs left out."""
    from monai.metrics import compute_hausdorff_distance

    label = torch.zeros(1, 1, 10, 10, 10)
    label[..., 1:5, 1:5, 1:5] = 1
    label[..., 6:9, 6:9, 6:9] = 2
    first = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    first[..., 2:5, 1:6, 1:5] = 1
    first[..., 6:9, 5:9, 6:8] = 2
    first[..., 0, 8:, 8:] = 3  # predicted where the label has no class 3
    second = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    second[..., 1:4, 1:5, 1:5] = 1  # class 2 missed
    onehot = lambda x: torch.nn.functional.one_hot(x.long(), 4).movedim(-1, 1)  # noqa: E731
    logits = [onehot(first).float(), onehot(second).float()]
    batch = {"image": torch.zeros(1, 1, 10, 10, 10), "label": label, "mask": torch.ones_like(label)}
    result = evaluate(_fixed_model(logits, surface_metrics=True), [batch, batch])

    def hd95(pred):
        return compute_hausdorff_distance(
            onehot(pred), onehot(label[:, 0]), include_background=True, percentile=95
        )[0]

    first_hd, second_hd = hd95(first), hd95(second)
    # MONAI: inf or NaN for a class empty in one of them
    assert not math.isfinite(float(second_hd[2])) and not math.isfinite(float(first_hd[3]))
    expected = (float(first_hd[1:3].mean()) + float(second_hd[1])) / 2
    assert result["case_hd95"] == math.inf
    assert result["case_hd95_found"] == pytest.approx(expected, rel=1e-5)
    assert result["hd95_one_sided"] == 2

    plain = evaluate(_fixed_model(logits), [batch, batch])  # no surface metrics
    assert math.isnan(plain["case_hd95_found"]) and math.isnan(plain["hd95_one_sided"])


def test_run_result_hd95_found_of_results_written_before_it():
    """Results stored before ``case_hd95_found`` existed: a finite per-case HD95 had nothing
    left out (the same value, 0 one-sided); an infinite one stays unknown (NaN)."""
    finite = RunResult("ce", 0, 0.5, 0.6, [0.5], [0.6], [0.1], [0.5], 0.5, 1.0, "x", case_hd95=3.0)
    assert (finite.case_hd95_found, finite.hd95_one_sided) == (3.0, 0)
    missed = RunResult("ce", 0, 0.5, 0.6, [0.5], [0.6], [0.1], [0.5], 0.5, 1.0, "x",
                       case_hd95=math.inf)  # fmt: skip
    assert math.isnan(missed.case_hd95_found) and math.isnan(missed.hd95_one_sided)


def test_evaluate_absent_class_and_ignored_voxels():
    label = torch.zeros(1, 1, 4, 4, 4)
    label[..., :2] = 1  # class 2 absent from the label
    mask = torch.ones(1, 1, 4, 4, 4)
    mask[..., 3] = 0
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1, ..., :2] = 1  # class 1 exactly right
    logits[:, 2, ..., 3] = 1  # class 2 predicted only where the mask is 0
    batch = {"image": torch.zeros(1, 1, 4, 4, 4), "label": label, "mask": mask}
    result = evaluate(_fixed_model([logits]), [batch])
    assert result["iou"][:2] == [1.0, 1.0] and math.isnan(result["iou"][2])
    assert result["dice"][:2] == [1.0, 1.0] and math.isnan(result["dice"][2])
    assert result["miou"] == 1.0 and result["dice_mean"] == 1.0
    assert result["case_miou"] == 1.0  # class 2, absent from label and prediction, left out

    logits[:, 2, 0, 0, 2] = 5  # now a false positive of class 2 on a valid voxel
    result = evaluate(_fixed_model([logits]), [batch])
    assert result["iou"][2] == 0.0 and result["dice"][2] == 0.0


def test_evaluate_rejects_multi_label_and_empty():
    with pytest.raises(ValueError, match="empty"):
        evaluate(_fixed_model([torch.zeros(1, 2, 2, 2, 2)]), [])
    model = LovaszSegmentationModule(3, network=torch.nn.Identity(), multi_label=True)
    with pytest.raises(ValueError, match="multi-class"):
        evaluate(model, [])


# -- report --------------------------------------------------------------------------------------


def _fake_result() -> ComparisonResult:
    runs = []
    for loss, base in (("ce", 0.5), ("lovasz", 0.7)):
        for seed in (0, 1):
            runs.append(
                RunResult(
                    loss=loss,
                    seed=seed,
                    miou=base + 0.1 * seed,
                    dice=base + 0.05 + 0.1 * seed,
                    iou=[0.9, base + 0.1 * seed, math.nan],
                    dice_per_class=[0.95, base, math.nan],
                    step_times=[9.0, 0.2, 0.2] if loss == "ce" else [9.0, 0.3, 0.3],
                    val_miou_curve=[0.1, base],
                    logged_val_miou=base,
                    wall_time=1.0,
                    run_dir="runs/x",
                )
            )
    return ComparisonResult(
        config="configs/demo.yaml",
        losses=["ce", "lovasz"],
        seeds=[0, 1],
        max_epochs=2,
        overrides=["--data.num_samples", "2"],
        class_names=["background", "a", "b"],
        counted_classes=[1, 2],
        num_val_volumes=2,
        command="python -m lovasz_monai.experiments compare --config configs/demo.yaml",
        runs=runs,
    )


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines]


def test_evaluation_cache_is_only_read_for_what_it_was_written_for(tmp_path, monkeypatch):
    """A stored evaluation is reused for the same checkpoint, arguments and package version, and
    reads as missing after any of them changes, or when the file is not ours."""
    import lovasz_monai

    checkpoint, path = tmp_path / "last.ckpt", tmp_path / "evaluation-test.json"
    metrics = {"miou": 0.5, "iou": [0.25, float("nan")], "num_volumes": 2}
    cache = EvaluationCache(path, checkpoint, ["--seed_everything", "0"])
    cache.write(metrics)  # no checkpoint yet: nothing to key it by, nothing written
    assert not path.exists() and cache.read() is None

    checkpoint.write_bytes(b"weights")
    cache.write(metrics)
    read = cache.read()
    assert read["miou"] == 0.5 and read["iou"][0] == 0.25 and math.isnan(read["iou"][1])

    assert EvaluationCache(path, checkpoint, ["--seed_everything", "1"]).read() is None
    monkeypatch.setattr(lovasz_monai, "__version__", "9.9.9")
    assert cache.read() is None
    monkeypatch.undo()
    assert cache.read() is not None
    monkeypatch.setattr(runs, "EVALUATION_FORMAT", runs.EVALUATION_FORMAT + 1)
    assert cache.read() is None  # written before evaluate() changed its keys
    monkeypatch.undo()
    checkpoint.write_bytes(b"retrained")  # another size (and time): another model
    assert cache.read() is None
    path.write_text("not json")
    assert cache.read() is None


def test_markdown_table_hand_made():
    result = _fake_result()
    text = markdown_table(result)
    assert "python -m lovasz_monai.experiments compare --config configs/demo.yaml" in text
    header, rule, ce, lovasz = _table_rows(text)
    assert header == [
        "loss", "seeds", "mIoU", "IoU background", "IoU a", "IoU b", "Dice", "train step (ms)",
        "timed step (ms)", "ratio",
    ]  # fmt: skip
    assert set(rule[1:]) == {"---:"}
    assert ce[:6] == ["`ce`", "2", "0.550 ± 0.071", "0.900 ± 0.000", "0.550 ± 0.071", "n/a"]
    assert lovasz[2] == "0.750 ± 0.071" and lovasz[6] == "0.800 ± 0.071"
    # the first step of each run is left out: 200 ms and 300 ms; no interleaved timing
    assert (ce[7], ce[8], ce[9], lovasz[7], lovasz[9]) == ("200", "n/a", "n/a", "300", "n/a")

    result.bench_times = {"ce": [0.10, 0.12, 0.5], "lovasz": [0.15, 0.18, 0.2]}
    _, _, ce, lovasz = _table_rows(markdown_table(result))
    assert (ce[8], ce[9], lovasz[8], lovasz[9]) == ("120", "1.00", "180", "1.50")
    # the comparison's process time, and the runs' own wall times (a continued run's in full)
    result.total_time, result.runs[0].wall_time = 90.0, 181.0
    assert "Total time: 1.5 min in the comparison processes" in markdown_table(result)
    assert "wall times, each over all its parts when it was continued, add up to 3.1 min" in (
        markdown_table(result)
    )


def test_markdown_table_many_small_classes():
    """Per-case columns, the 5 smallest classes by training voxels (hand-picked here), and no
    per-class columns beyond 16 classes."""
    names = [f"c{i}" for i in range(20)]
    voxels = [10_000] + [1000 + 10 * i for i in range(19)]  # c1 .. c5 are the smallest
    voxels[7] = 5  # and c7, which beats them all
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        case_iou = [0.5 + shift] * 20
        case_iou[1:5] = [0.1 + shift, 0.2 + shift, 0.3 + shift, 0.4 + shift]
        case_iou[7] = 0.0 + shift
        runs.append(
            RunResult("ce", seed, 0.6, 0.7, [0.6] * 20, [0.7] * 20, [0.2], [0.5], 0.5, 1.0, "x",
                      case_miou=0.55 + shift, case_iou=case_iou, case_dice=0.65 + shift,
                      case_hd95=3.0 + 10 * shift, class_voxels=voxels)
        )  # fmt: skip
    result = ComparisonResult(
        "configs/x.yaml", ["ce"], [0, 1], 2, [], names, list(range(1, 20)), 8, "cmd", runs
    )
    text = markdown_table(result)
    header, _, row = _table_rows(text)
    assert header == [
        "loss", "seeds", "per-case mIoU", "5 smallest", "per-case Dice", "HD95 (mm)", "mIoU",
        "Dice", "train step (ms)", "timed step (ms)", "ratio",
    ]  # fmt: skip
    # the smallest: c7 (0.0), c1 .. c4 (0.1 .. 0.4): mean 0.2, then 0.3 with seed 1
    assert row[1:7] == ["2", "0.600 ± 0.071", "0.250 ± 0.071", "0.700 ± 0.071", "3.500 ± 0.707",
                        "0.600 ± 0.000"]  # fmt: skip
    assert "fewest training voxels (c7, c1, c2, c3, c4)" in text
    assert "mIoU = mean over the 19 counted classes (all but c0);" in text  # not all 19 names

    # a second loss on seeds 1 and 2: differences to the first loss on seed 1 only, the seed
    # both have; 0.65 + 0.01 against 0.65, and 5 smallest 0.30 + 0.05 against 0.30
    for seed in (1, 2):
        case_iou = [iou + 0.05 for iou in runs[1].case_iou]
        result.runs.append(
            RunResult("lovasz", seed, 0.6, 0.7, [0.6] * 20, [0.7] * 20, [0.2], [0.5], 0.5, 1.0,
                      "x", case_miou=0.66 + seed, case_iou=case_iou, case_dice=0.7,
                      case_hd95=3.0, class_voxels=voxels)
        )  # fmt: skip
    result.losses.append("lovasz")
    text = markdown_table(result)
    header, _, ce, lovasz = _table_rows(text)
    assert header[:6] == ["loss", "seeds", "per-case mIoU", "- ce", "5 smallest", "- ce"]
    assert ce[1:6] == ["2", "0.600 ± 0.071", "+0.000 ± 0.000 (2)", "0.250 ± 0.071",
                       "+0.000 ± 0.000 (2)"]  # fmt: skip
    assert lovasz[1] == "2" and lovasz[3] == "+1.010 ± 0.000 (1)"
    assert lovasz[5] == "+0.050 ± 0.000 (1)"
    assert "on the seeds both losses have" in text


def test_markdown_table_hd95_over_found_structures():
    """When a run has a one-sided structure (HD95 inf), the HD95 column is the mean over the
    structures found and a column counts the one-sided pairs; results without any keep the
    plain HD95 column."""
    names = ["bg", "a", "b"]

    def run(seed: int, found: float, one_sided: int) -> RunResult:
        return RunResult("ce", seed, 0.6, 0.7, [0.6] * 3, [0.7] * 3, [0.2], [0.5], 0.5, 1.0,
                         "x", case_miou=0.5, case_iou=[0.5] * 3, case_dice=0.6,
                         case_hd95=math.inf if one_sided else found, case_hd95_found=found,
                         hd95_one_sided=one_sided, class_voxels=[100, 10, 20])  # fmt: skip

    result = ComparisonResult(
        "configs/x.yaml", ["ce"], [0, 1], 2, [], names, [1, 2], 8, "cmd", [run(0, 4.0, 3)]
    )
    result.runs.append(run(1, 6.0, 0))
    text = markdown_table(result)
    header, _, row = _table_rows(text)
    hd95 = header.index("HD95 found (mm)")
    assert header[hd95 + 1] == "one-sided" and "HD95 (mm)" not in header
    assert row[hd95 : hd95 + 2] == ["5.000 ± 1.414", "1.5 ± 2.1"]
    assert "summed over the 8 volumes" in text
    assert ComparisonResult.from_json(result.to_json()) == result

    result.runs = [run(0, 4.0, 0), run(1, 6.0, 0)]
    header, _, row = _table_rows(markdown_table(result))
    assert "one-sided" not in header and row[header.index("HD95 (mm)")] == "5.000 ± 1.414"

    # every structure one-sided in every volume: no HD95 to average, but the count is shown
    result.runs = [run(0, math.nan, 5), run(1, math.nan, 7)]
    header, _, row = _table_rows(markdown_table(result))
    hd95 = header.index("HD95 found (mm)")
    assert row[hd95 : hd95 + 2] == ["n/a", "6.0 ± 1.4"]


def test_markdown_states_scaling():
    result = _fake_result()
    result.config_max_epochs = 40
    assert "2 epochs per run (the config has 40; the cosine" in markdown_table(result)
    assert "Scaled down from the config" in markdown_table(result)
    result.scaled_down = False
    assert "Scaled down" not in markdown_table(result)


def test_json_round_trip_and_report(tmp_path):
    result = _fake_result()
    result.bench_times = {"ce": [0.1], "lovasz": [0.2]}
    md, js, png = write_results(result, tmp_path / "first")
    assert (md.name, js.name, png.name) == ("first.md", "first.json", "first.png")
    data = json.loads(js.read_text())
    assert data["runs"][0]["iou"][2] is None  # NaN is written as null
    again = report(js, tmp_path / "again")
    assert math.isnan(again.runs[0].iou[2]) and again.runs[1].iou[1] == result.runs[1].iou[1]
    assert (tmp_path / "again.md").read_text() == md.read_text()
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE
    written = js.read_text()
    main(["report", str(js)])  # rewrites first.md in place, not the JSON nor its command
    assert md.read_text() == (tmp_path / "again.md").read_text()
    assert js.read_text() == written and result.command in md.read_text()
    with pytest.raises(SystemExit):
        main(["report", str(js), "--data.num_samples", "1"])


def test_json_replaces_only_non_finite_floats(tmp_path):
    """NaN becomes null wherever it is (lists, dicts), ``inf`` stays a float (``Infinity`` in
    the file); strings holding "NaN" are kept as they are."""
    result = _fake_result()
    result.class_names[1], result.command = "NaNo", "cmd NaN --x Infinity"
    result.runs[0].run_dir = "runs/NaN"
    result.runs[0].case_hd95, result.runs[1].case_hd95 = math.inf, -math.inf
    result.bench_times = {"ce": [0.1, math.nan]}
    data = result.to_json()
    assert data["class_names"][1] == "NaNo" and data["command"] == "cmd NaN --x Infinity"
    assert data["bench_times"]["ce"][1] is None and data["runs"][0]["iou"][2] is None
    assert data["runs"][0]["case_hd95"] == math.inf and data["runs"][1]["case_hd95"] == -math.inf
    back = ComparisonResult.from_json(data)
    assert back.class_names == result.class_names and back.runs[0].run_dir == "runs/NaN"
    assert math.isnan(back.bench_times["ce"][1]) and back.runs[0].case_hd95 == math.inf
    js = write_results(back, tmp_path / "cmp")[1]
    assert '"case_hd95": Infinity' in js.read_text() and "nullo" not in js.read_text()
    assert report(js).command == "cmd NaN --x Infinity"


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


#: changes of a valid comparison's JSON (in place, or the new JSON), and the start of the message
#: that names the problem
MALFORMED = [
    (lambda d: [d], "expected a JSON object of ComparisonResult fields, got list [{"),
    (lambda d: {}, "expected the fields of ComparisonResult, missing ['class_names', 'command'"),
    (lambda d: {**d, "x": 1}, "expected the fields of ComparisonResult, unknown ['x']"),
    (lambda d: d["runs"][1].update(loss="foo"), "runs[1].loss: expected one of losses ["),
    (lambda d: d.update(losses=[]), "losses: expected at least one loss, got []"),
    (
        lambda d: d["runs"][0].update(iou=[0.5, 0.5]),
        "runs[0].iou: expected 3 values (one per class of class_names), got 2",
    ),
    (lambda d: d["runs"][2].update(case_iou=[0.5]), "runs[2].case_iou: expected 3 values"),
    (
        lambda d: d.update(counted_classes=[1, 3, -1]),
        "counted_classes: expected indices 0 to 2 of class_names, got [3, -1]",
    ),
    (
        lambda d: d["runs"][0].update(counted_classes=[5]),
        "runs[0].counted_classes: expected indices 0 to 2 of class_names, got [5]",
    ),
    (
        lambda d: d["runs"][3].__delitem__("seed"),
        "runs[3]: expected the fields of RunResult, missing ['seed']",
    ),
    (lambda d: d["runs"][0].update(miou="0.5"), "runs[0].miou: expected float, got str '0.5'"),
    (lambda d: d["runs"][0]["iou"].insert(1, "x"), "runs[0].iou[1]: expected float, got str 'x'"),
    (lambda d: d["runs"][0].update(seed=True), "runs[0].seed: expected int, got bool True"),
    (lambda d: d.update(max_epochs=2.5), "max_epochs: expected int, got float 2.5"),
    (
        lambda d: d.update(config_max_epochs="4"),
        "config_max_epochs: expected int | None, got str '4'",
    ),
    (lambda d: d.update(bench_times={"ce": [0.1, "a"]}), "bench_times['ce'][1]: expected float"),
    (lambda d: d.update(runs={"ce": []}), "runs: expected list[RunResult], got dict {'ce': []}"),
    (
        lambda d: d.update(runs=[1]),
        "runs[0]: expected a JSON object of RunResult fields, got int 1",
    ),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_report_refuses_a_malformed_json_naming_file_and_field(tmp_path, change, message):
    """``report`` of a JSON that is not a comparison: a ``ValueError`` naming the file, the
    field, what it should be and what it is (not a KeyError, IndexError or TypeError deep in
    the table), and no table written."""
    data = _fake_result().to_json()
    changed = change(data)
    path = _write_json(tmp_path / "bad.json", data if changed is None else changed)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        main(["report", str(path)])
    assert str(raised.value).startswith(f"{path}: {message}")
    assert not (tmp_path / "bad.md").exists()


def test_report_of_a_loss_renamed_since_warns_and_keeps_its_results(tmp_path):
    """A result file stays readable when a recipe it names is no longer in LOSSES."""
    data = _fake_result().to_json()
    old = data["losses"][1]
    data["losses"][1] = "renamed_recipe"
    for run in data["runs"]:
        if run["loss"] == old:
            run["loss"] = "renamed_recipe"
    path = _write_json(tmp_path / "old.json", data)
    with pytest.warns(UserWarning, match=r"\['renamed_recipe'\] are not recipes of this version"):
        result = report(path)
    assert [r.loss for r in result.runs].count("renamed_recipe") >= 1
    text = (tmp_path / "old.md").read_text()
    assert "- `renamed_recipe`: (not a recipe of this version)" in text
    assert "| `renamed_recipe` |" in text


def test_report_reads_older_files_and_names_a_file_that_is_not_json(tmp_path):
    """Files written before the later fields existed still load (defaults, and the HD95 over
    found structures from a finite per-case HD95); null is NaN in any float field."""
    data = _fake_result().to_json()
    for key in ("sources", "processes", "config_max_epochs", "scaled_down"):
        del data[key]
    for run in data["runs"]:
        for key in ("case_iou", "case_dice", "case_hd95_found", "hd95_one_sided", "eval_split",
                    "class_voxels", "resumed_at_steps", "case_miou"):  # fmt: skip
            del run[key]
    data["runs"][0]["case_hd95"], data["total_time"], data["config"] = 4.0, None, str(DEMO)
    result = report(_write_json(tmp_path / "old.json", data))
    assert (result.runs[0].case_hd95_found, result.runs[0].hd95_one_sided) == (4.0, 0)
    assert result.config_max_epochs is not None  # from the config
    assert math.isnan(result.total_time) and result.sources == [] and result.processes == 1
    assert (tmp_path / "old.md").is_file()
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: Expecting property name"):
        report(path)


def _split_by_seed(result: ComparisonResult) -> tuple[ComparisonResult, ComparisonResult]:
    """Two comparisons from one: seed 0 of every loss, and seed 1 (of ``lovasz`` only)."""
    first, second = (ComparisonResult.from_json(result.to_json()) for _ in range(2))
    first.runs = [r for r in first.runs if r.seed == 0]
    first.seeds, first.command, first.total_time = [0], "compare --seeds 0", 60.0
    second.runs = [r for r in second.runs if r.seed == 1 and r.loss == "lovasz"]
    second.losses, second.seeds, second.command, second.total_time = ["lovasz"], [1], "s1", 30.0
    return first, second


def test_merge_results_reports_the_runs_of_several_comparisons(tmp_path):
    """Seeds trained in two comparisons give the table one comparison of them all would give
    (its runs, scores and paired differences), naming both commands."""
    whole = _fake_result()
    for k, run in enumerate(whole.runs):
        run.case_miou, run.eval_split = 0.5 + 0.01 * k * k, "test"
    whole.runs = [r for r in whole.runs if (r.loss, r.seed) != ("ce", 1)]
    first, second = _split_by_seed(whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        merged = merge_results([first, second], "merge cmd")
    assert merged.losses == ["ce", "lovasz"] and merged.seeds == [0, 1]
    assert sorted((r.loss, r.seed) for r in merged.runs) == [
        ("ce", 0),
        ("lovasz", 0),
        ("lovasz", 1),
    ]
    assert merged.sources == ["compare --seeds 0", "s1"] and merged.total_time == 90.0
    text = markdown_table(merged)
    whole.command, whole.sources, whole.total_time = "merge cmd", merged.sources, 90.0
    assert text == markdown_table(whole)
    assert "The runs of these comparisons, merged (" in text
    assert "```bash\ncompare --seeds 0\ns1\n```" in text
    # lovasz - ce on seed 0, the only seed ce has: (0.5 + 0.04) - 0.5
    lovasz = next(row for row in _table_rows(text) if row[0] == "`lovasz`")
    assert lovasz[1:4] == ["2", "0.565 ± 0.035", "+0.040 ± 0.000 (1)"]

    # a merged comparison merges again; the sources stay those of the trainings
    third = ComparisonResult.from_json(second.to_json())
    third.command, third.runs[0].seed, third.seeds = "s2", 2, [2]
    again = merge_results([merged, third], "merge again")
    assert again.sources == ["compare --seeds 0", "s1", "s2"] and again.seeds == [0, 1, 2]


def test_merge_results_refuses_what_does_not_compare():
    first, second = _split_by_seed(_fake_result())
    with pytest.raises(ValueError, match="needs at least one"):
        merge_results([], "cmd")
    second.max_epochs = 3
    with pytest.raises(
        ValueError, match=r"different max_epochs: 2 \(compare --seeds 0\) against 3"
    ):
        merge_results([first, second], "cmd")
    second.max_epochs, second.class_names = 2, ["background", "a", "c"]
    with pytest.raises(ValueError, match="different class_names"):
        merge_results([first, second], "cmd")
    second.class_names = first.class_names
    second.runs[0].eval_split = "test"
    with pytest.raises(ValueError, match=r"different splits: \['test', 'val'\]"):
        merge_results([first, second], "cmd")
    second.runs[0].eval_split = "val"
    second.config_max_epochs = 40  # unknown (None) in the first: taken from the second
    assert merge_results([first, second], "cmd").config_max_epochs == 40
    second.config_max_epochs = None
    first.bench_times, second.bench_times = {"ce": [0.1]}, {"lovasz": [0.2]}
    with pytest.raises(ValueError, match="more than one interleaved step timing"):
        merge_results([first, second], "cmd")
    second.bench_times = {}
    assert merge_results([first, second], "cmd").bench_times == {"ce": [0.1]}


def test_merge_results_keeps_the_last_of_a_run_trained_twice():
    first, second = _split_by_seed(_fake_result())
    retrained = ComparisonResult.from_json(first.to_json())
    retrained.command = "again"
    retrained.runs = [r for r in retrained.runs if r.loss == "ce"]
    retrained.runs[0].miou = 0.25
    with pytest.warns(UserWarning, match="ce seed 0 is found more than once; the run of 'again'"):
        merged = merge_results([first, second, retrained], "cmd")
    assert [r.miou for r in merged.by_loss("ce")] == [0.25]


def test_merge_results_order_and_threads():
    """The first comparison's first loss is the baseline; other thread counts merge, with a
    warning (their step times do not compare)."""
    first, second = _split_by_seed(_fake_result())
    assert merge_results([second, first], "cmd").losses == ["lovasz", "ce"]
    second.torch_threads = 8
    with pytest.warns(UserWarning, match=r"different torch threads \[1, 8\]"):
        assert merge_results([first, second], "cmd").torch_threads == 1


def test_report_command_merges_json_files(tmp_path, capsys):
    first, second = _split_by_seed(_fake_result())
    paths = [write_results(r, tmp_path / name)[1] for r, name in ((first, "a"), (second, "b"))]
    args = ["report", str(paths[0]), str(paths[1]), "--output", str(tmp_path / "ab")]
    merged = main(args)
    assert merged.command == "python -m lovasz_monai.experiments " + " ".join(args)
    assert {p.name for p in tmp_path.iterdir()} >= {"ab.md", "ab.json", "ab.png"}
    assert json.loads((tmp_path / "ab.json").read_text())["sources"] == ["compare --seeds 0", "s1"]
    assert report(tmp_path / "ab.json").seeds == [0, 1]
    with pytest.raises(SystemExit):
        main(["report", str(paths[0]), str(paths[1])])
    assert "merging several JSON files needs --output" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs an output path"):
        report(paths)
    with pytest.raises(ValueError, match="would overwrite one of the inputs"):
        report(paths, tmp_path / "a")
    with pytest.raises(ValueError, match="at least one JSON"):
        report([])


def test_plot_comparison_writes_png(tmp_path):
    path = plot_comparison(_fake_result(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_validation_curves_shows_every_run(tmp_path, monkeypatch):
    """Runs without a validation split have no curves: the second panel plots the per-case
    mIoU of every run, one series per seed (here: 2 seeds of one loss, 1 of the other)."""
    import matplotlib.axes

    result = _fake_result()
    result.runs = [r for r in result.runs if not (r.loss == "lovasz" and r.seed == 1)]
    for k, run in enumerate(result.runs):
        run.val_miou_curve, run.case_miou = [], 0.5 + 0.1 * k
    plotted = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda ax, *a, **k: plotted.append((a, k)) or plot(ax, *a, **k),
    )
    path = plot_comparison(result, tmp_path / "runs.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    series = {k["label"]: (list(a[0]), list(a[1])) for a, k in plotted}
    assert series == {"seed 0": ([0, 1], [0.5, 0.7]), "seed 1": ([0], [0.6])}


# -- the command, on a tiny setting ------------------------------------------------------------


def _tiny_overrides(tmp_path: Path, num_cases: int = 4) -> list[str]:
    """LovaszCLI overrides of the demo config for runs of a few seconds: synthetic 16^3 volumes
    written to ``tmp_path / "data"`` (1 of them to validation, batches of 2), a 2-level UNet."""
    return [
        "--data.data_dir", str(tmp_path / "data"),
        "--data.synthetic_kwargs",
        f'{{"num_cases": {num_cases}, "num_test": 1, "size": [16, 16, 16], "num_classes": 3}}',
        "--data.roi_size", "[16, 16, 16]", "--data.num_samples", "1",
        "--model.unet_channels", "[4, 8]", "--model.unet_strides", "[2]",
    ]  # fmt: skip


@pytest.mark.slow
def test_compare_command_tiny(tmp_path):
    output = tmp_path / "results" / "cmp"
    command = [
        sys.executable, "-m", "lovasz_monai.experiments", "compare",
        "--config", str(DEMO), "--losses", "ce", "lovasz", "--seeds", "0",
        "--max-epochs", "1", "--output", str(output), "--runs-dir", str(tmp_path / "runs"),
        *_tiny_overrides(tmp_path, num_cases=3),
        "--bench-repeats", "2", "--eval-split", "test",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[2/2]" in done.stdout

    text = output.with_suffix(".md").read_text(encoding="utf-8")
    assert "--losses ce lovasz --seeds 0 --max-epochs 1" in text
    # the synthetic test images have no labels: evaluated on the validation split, said so
    assert "the 1 validation volume(s)" in text and "test volume" not in text
    rows = _table_rows(text)
    header, body = rows[0], rows[2:]
    assert header == [
        "loss", "seeds", "per-case mIoU", "- ce", "per-case Dice", "mIoU", "IoU background",
        "IoU class_1", "IoU class_2", "Dice", "train step (ms)", "timed step (ms)", "ratio",
    ]  # fmt: skip
    assert [r[:2] for r in body] == [["`ce`", "1"], ["`lovasz`", "1"]]
    for row in body:
        for cell in [row[2], *row[4:10]]:
            match = re.fullmatch(r"(\d+\.\d{3}) ± (\d+\.\d{3})", cell)
            assert match, cell
            assert 0.0 <= float(match.group(1)) <= 1.0 and float(match.group(2)) == 0.0
        assert float(row[10]) > 0 and float(row[11]) > 0 and float(row[12]) > 0
    # the difference to the first loss, seed by seed
    difference = float(body[1][2].split()[0]) - float(body[0][2].split()[0])
    assert body[0][3] == "+0.000 ± 0.000 (1)"
    assert float(body[1][3].split()[0]) == pytest.approx(difference, abs=1.5e-3)
    assert body[0][12] == "1.00"

    png = output.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    data = json.loads(output.with_suffix(".json").read_text())
    assert {k: len(v) for k, v in data["bench_times"].items()} == {"ce": 2, "lovasz": 2}
    assert [(r["loss"], r["seed"]) for r in data["runs"]] == [("ce", 0), ("lovasz", 0)]
    for run in data["runs"]:
        assert len(run["val_miou_curve"]) == 1 and len(run["step_times"]) >= 1
        # our evaluation reproduces the module's logged val/mIoU of the same final model
        assert run["miou"] == pytest.approx(run["logged_val_miou"], abs=1e-4)
        assert (tmp_path / "runs" / run["loss"] / "seed0" / "checkpoints" / "last.ckpt").is_file()

    # --resume: the finished runs are not trained again; the evaluation stored next to each
    # checkpoint is reused (shown by a value planted in one), the other run's is recomputed
    first = json.loads(output.with_suffix(".json").read_text())
    last = tmp_path / "runs" / "lovasz" / "seed0" / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    stored = tmp_path / "runs" / "lovasz" / "seed0" / "evaluation-val.json"
    planted = json.loads(stored.read_text())
    planted["metrics"]["case_miou"] = 0.123
    stored.write_text(json.dumps(planted))
    (tmp_path / "runs" / "ce" / "seed0" / "evaluation-val.json").unlink()
    resumed = [*command[: command.index("--bench-repeats")], "--bench-repeats", "0", "--resume"]
    done = subprocess.run(resumed, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(output.with_suffix(".json").read_text())
    assert last.stat().st_mtime_ns == stamp
    assert [r["case_miou"] for r in again["runs"]][1] == 0.123

    # --finished-only: trains nothing; reports the finished runs of the asked losses and seeds
    partial = [*resumed[: resumed.index("--losses")], "--losses", "ce", "lovasz", "dicece"]
    partial += [*resumed[resumed.index("--seeds") :]]
    partial[partial.index("--seeds") + 1 : partial.index("--seeds") + 2] = ["0", "1"]
    partial[partial.index("--output") + 1] = str(tmp_path / "partial")
    partial = [a for a in partial if a != "--resume"] + ["--finished-only"]
    done = subprocess.run(partial, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "partial.json").read_text())
    assert [(r["loss"], r["seed"]) for r in data["runs"]] == [("ce", 0), ("lovasz", 0)]
    assert data["losses"] == ["ce", "lovasz"] and data["seeds"] == [0, 1]
    assert not (tmp_path / "runs" / "ce" / "seed1").exists()
    assert data["runs"][1]["case_miou"] == 0.123
    assert (tmp_path / "runs" / "ce" / "seed0" / "evaluation-val.json").is_file()
    for a, b in zip(first["runs"], again["runs"], strict=True):
        assert (a["loss"], a["miou"], a["iou"], a["step_times"]) == (
            b["loss"],
            b["miou"],
            b["iou"],
            b["step_times"],
        )


class _Stopped(Exception):
    """Raised by the test to stop a training part-way, as a killed process would."""


def test_a_run_stopped_part_way_continues_from_its_last_epoch(tmp_path, monkeypatch):
    tiny = _tiny_overrides(tmp_path)
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    save = EpochCheckpoint.on_train_epoch_end

    def save_then_stop_after_epoch_1(self, trainer, module):
        save(self, trainer, module)
        if trainer.current_epoch == 1:
            raise _Stopped

    monkeypatch.setattr(EpochCheckpoint, "on_train_epoch_end", save_then_stop_after_epoch_1)
    with pytest.raises(_Stopped):
        run_one(DEMO, "lovasz_ce", 0, 4, run_dir, tiny)
    monkeypatch.undo()
    assert not training_finished(run_dir)
    saved = torch.load(checkpoints / "interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 4  # 3 training volumes in batches of 2: 2 steps an epoch
    recorder = saved["callbacks"]["TrainingRecorder"]
    first_steps, first_scores = recorder["step_times"], recorder["val_miou"]
    assert len(first_steps) == 4 and len(first_scores) == 2
    # saved after everything that ends epoch 1: ModelCheckpoint has seen both scores
    (best,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert float(best["best_model_score"]) == pytest.approx(max(first_scores))
    assert saved["callbacks"]["EpochCheckpoint"]["world_size"] == 1

    # continuing with other arguments, or on another number of processes, is refused
    with pytest.raises(ValueError, match="written by a training with other arguments"):
        run_one(DEMO, "lovasz_ce", 0, 5, run_dir, tiny, resume=True)
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    saved["callbacks"]["EpochCheckpoint"]["world_size"] = 2
    saved["callbacks"]["EpochCheckpoint"]["key"] = [
        str(other) if a == str(run_dir) else a for a in saved["callbacks"]["EpochCheckpoint"]["key"]
    ]
    torch.save(saved, other / "checkpoints" / "interrupted.ckpt")
    with pytest.raises(ValueError, match="written by a training on 2 process"):
        run_one(DEMO, "lovasz_ce", 0, 4, other, tiny, resume=True)

    run = run_one(DEMO, "lovasz_ce", 0, 4, run_dir, tiny, resume=True)
    assert training_finished(run_dir) and not (checkpoints / "interrupted.ckpt").exists()
    assert run.resumed_at_steps == [4]
    assert len(run.step_times) == 8 and run.step_times[:4] == first_steps
    assert len(run.val_miou_curve) == 4 and run.val_miou_curve[:2] == first_scores
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8 and last["epoch"] == 3
    # the schedule went on where it stopped: 4 epoch steps of a cosine over 4 epochs end at 0
    (scheduler,) = last["lr_schedulers"]
    assert scheduler["last_epoch"] == 4 and scheduler["_last_lr"] == [pytest.approx(0.0)]
    steps = [int(s["step"]) for s in last["optimizer_states"][0]["state"].values()]
    assert set(steps) == {8}
    # the time before the stop counts
    assert run.wall_time > recorder["fit_seconds"] + sum(run.step_times[4:])
    recorded = json.loads((run_dir / "recorder.json").read_text())
    assert recorded["resumed_at_steps"] == [4] and recorded["step_times"] == run.step_times
    assert recorded["fit_seconds"] > recorded["resumed_seconds"] >= recorder["fit_seconds"]

    # a finished run is reused as it is; without resume a run folder is trained from the start
    again = run_one(DEMO, "lovasz_ce", 0, 4, run_dir, tiny, resume=True)
    assert again.step_times == run.step_times and again.resumed_at_steps == [4]
    fresh = run_one(DEMO, "lovasz_ce", 0, 1, run_dir, tiny)
    assert fresh.resumed_at_steps == [] and len(fresh.step_times) == 2
    table = markdown_table(
        ComparisonResult(
            DEMO, ["lovasz_ce"], [0], 4, tiny, run.class_names, run.counted_classes, 1, "cmd", [run]
        )
    )
    assert "- `lovasz_ce` seed 0: at step(s) 4" in table


def test_a_continued_training_draws_other_random_numbers_than_its_start():
    """Lightning keeps no random state: a continuation reseeds from (seed, step, rank), so it
    neither repeats the first epochs' draws nor gives every DDP process the same ones."""

    def draws_after_continuing(global_step: int, rank: int) -> list[float]:
        torch.manual_seed(7)
        callback = EpochCheckpoint("unused.ckpt", key=["a"])
        callback._rank = rank
        callback.load_state_dict({"key": ["a"], "world_size": 1, "global_step": global_step})
        draws = [torch.rand(()).item(), float(np.random.rand()), random.random()]
        return draws

    torch.manual_seed(7)
    start = torch.rand(()).item()
    at_4 = draws_after_continuing(4, 0)
    assert at_4 == draws_after_continuing(4, 0)  # reproducible
    assert at_4[0] != start
    for other in (draws_after_continuing(6, 0), draws_after_continuing(4, 1)):
        assert all(a != b for a, b in zip(at_4, other, strict=True))


@pytest.mark.slow
def test_a_killed_ddp_comparison_continues_where_it_stopped(tmp_path):
    command = [
        sys.executable, "-m", "lovasz_monai.experiments", "compare",
        "--config", str(DEMO), "--losses", "lovasz_ce", "--seeds", "0", "--max-epochs", "6",
        "--output", str(tmp_path / "cmp"), "--runs-dir", str(tmp_path / "runs"),
        *_tiny_overrides(tmp_path),
        "--bench-repeats", "0", "--processes", "2",
    ]  # fmt: skip
    checkpoints = tmp_path / "runs" / "lovasz_ce" / "seed0" / "checkpoints"
    interrupted = checkpoints / "interrupted.ckpt"
    training = subprocess.Popen(
        command, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:  # kill the whole process group (the comparison and its 2 DDP workers) after epoch 2
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and training.poll() is None:
            if interrupted.is_file() and torch.load(interrupted, weights_only=False)["epoch"] >= 2:
                break
            time.sleep(0.2)
        assert training.poll() is None, "the training ended before it could be killed"
    finally:
        os.killpg(training.pid, signal.SIGKILL)
        training.wait()
    stopped_at = torch.load(interrupted, weights_only=False)["global_step"]
    shutil.copy(interrupted, interrupted.with_name("before.ckpt"))
    assert 0 < stopped_at < 6  # 3 training volumes, 2 per process, batches of 2: 1 step an epoch

    done = subprocess.run([*command, "--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads((tmp_path / "cmp.json").read_text())["runs"]
    assert run["resumed_at_steps"] == [stopped_at] and len(run["step_times"]) == 6
    before = torch.load(interrupted.with_name("before.ckpt"), weights_only=False)
    recorder = before["callbacks"]["TrainingRecorder"]
    assert run["wall_time"] > recorder["fit_seconds"]
    # saved after the CLI's ModelCheckpoint (which the CLI adds after the given callbacks)
    (best,) = [v for k, v in before["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert float(best["best_model_score"]) == pytest.approx(max(recorder["val_miou"]))
    assert len(recorder["val_miou"]) == stopped_at
    assert len(run["val_miou_curve"]) == 6 and not interrupted.exists()
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 5
    assert last["lr_schedulers"][0]["last_epoch"] == 6
    assert f"seed 0: at step(s) {stopped_at}" in (tmp_path / "cmp.md").read_text()


def test_old_import_paths_still_work():
    """``lovasz_monai.experiments`` / ``lovasz_monai.benchmark`` forward to ``lovasz_monai.tools``;
    the ``class_path`` ``lovasz_monai.experiments.MaskedDiceCELoss`` of older configs resolves."""
    from lovasz_monai import benchmark as old_benchmark
    from lovasz_monai import experiments as old_experiments
    from lovasz_monai.tools import benchmark, experiments, measure, report

    with pytest.warns(DeprecationWarning, match="import it from lovasz_monai.losses"):
        assert old_experiments.MaskedDiceCELoss is MaskedDiceCELoss
    with pytest.warns(DeprecationWarning, match="lovasz_monai.tools.experiments"):
        assert old_experiments.compare is experiments.compare
    with pytest.warns(DeprecationWarning, match="lovasz_monai.tools.report"):
        assert old_experiments.aggregate is report.aggregate
    with pytest.warns(DeprecationWarning, match="lovasz_monai.tools.benchmark"):
        assert old_benchmark.main is benchmark.main
    with pytest.warns(DeprecationWarning, match="lovasz_monai.tools.measure"):
        assert old_benchmark.time_fwd_bwd is measure.time_fwd_bwd
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        old_experiments.nothing  # noqa: B018
    # each name has one home: the tools' modules re-export nothing
    assert set(experiments.__all__) == {"compare", "main", "run_order"}
    assert not {"peak_memory_bytes", "time_fwd_bwd"} & set(benchmark.__all__)
    assert LOSSES["dicece"].model(1, 0, 0)["loss"]["class_path"] == (
        "lovasz_monai.losses.MaskedDiceCELoss"
    )


def test_benchmark_steps_times_fine_tuning_recipes_in_their_final_phase(tmp_path, monkeypatch):
    """One value per timed round and recipe; a fine-tuning recipe (Dice+CE, then Lovász + CE)
    runs its Lovász loss in every round, warm-up rounds included."""
    from lovasz_monai.losses import LovaszCELoss
    from lovasz_monai.tools.runs import benchmark_steps

    calls = []
    forward = LovaszCELoss.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LovaszCELoss, "forward", counted)
    data = ["--data.data_dir", str(tmp_path / "data"), "--data.num_workers", "0"]
    data += ["--data.synthetic_kwargs.size", "[24, 24, 24]", "--data.roi_size", "[16, 16, 16]"]
    data += ["--data.synthetic_kwargs.num_cases", "4", "--data.val_fraction", "0.25"]
    times = benchmark_steps(
        ROOT / "configs" / "demo.yaml",
        ["dicece", "dicece_to_lovasz_ce"],
        tmp_path / "runs",
        data,
        2,
        1,
    )
    assert {loss: len(values) for loss, values in times.items()} == {
        "dicece": 2, "dicece_to_lovasz_ce": 2
    }  # fmt: skip
    assert all(t > 0 for values in times.values() for t in values)
    assert len(calls) == 3  # 1 warm-up + 2 timed rounds, Dice+CE never calls it
