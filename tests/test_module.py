"""Unit tests of LovaszSegmentationModule (no CLI, no files)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader

from lovasz_monai.losses import LovaszCELoss, LovaszHingeLoss
from lovasz_monai.losses.base import accepts_mask
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.objective import call_loss

S = (16, 16, 16)


def tiny_model(num_classes: int = 3, **kwargs) -> LovaszSegmentationModule:
    kwargs.setdefault("unet_channels", (4, 8))
    kwargs.setdefault("unet_strides", (2,))
    kwargs.setdefault("unet_num_res_units", 0)
    kwargs.setdefault("roi_size", S)
    return LovaszSegmentationModule(num_classes=num_classes, **kwargs)


def make_batch(num_classes: int = 3, batch: int = 2, regions: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, *S, generator=g)
    if regions is None:
        label = torch.randint(0, num_classes, (batch, 1, *S), generator=g).float()
    else:
        label = (torch.rand(batch, regions, *S, generator=g) > 0.5).float()
    mask = torch.ones(batch, 1, *S)
    mask[..., :4] = 0
    return {"image": image, "label": label, "mask": mask}


class SpyLoss(nn.Module):
    """Records its calls; returns ``value`` times the logits mean (so there is a gradient)."""

    def __init__(self, value: float = 1.0, with_mask: bool = True) -> None:
        super().__init__()
        self.value = value
        self.calls: list[dict] = []
        if not with_mask:
            self.forward = self._forward_no_mask  # type: ignore[method-assign]

    def forward(self, input, target, mask=None):
        self.calls.append({"input": input, "target": target, "mask": mask})
        return self.value + 0 * input.mean()

    def _forward_no_mask(self, input, target):
        self.calls.append({"input": input, "target": target, "mask": None})
        return self.value + 0 * input.mean()


def iou_numpy(pred: np.ndarray, target: np.ndarray, valid: np.ndarray, c: int) -> float:
    p, t = (pred == c) & valid, (target == c) & valid
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else math.nan


# -- training step ------------------------------------------------------------------------------


def test_training_step_finite_loss_and_gradients():
    model = tiny_model()
    loss = model.training_step(make_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert isinstance(model.loss, LovaszCELoss) and model.loss.to_onehot_y
    # the default recipe: Lovász + 0.3 x CE (docs/guides/which_loss.md)
    assert (model.loss.lambda_lovasz, model.loss.lambda_ce) == (1.0, 0.3)


def test_training_step_bf16_autocast_is_finite():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(make_batch(), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "loss",
    [DiceCELoss(to_onehot_y=True, softmax=True), nn.CrossEntropyLoss()],
    ids=["monai-DiceCE", "torch-CE"],
)
def test_other_losses_work(loss):
    model = tiny_model(loss=loss)
    out = model.training_step(make_batch(), 0)
    out.backward()
    assert torch.isfinite(out)


# -- schedule -----------------------------------------------------------------------------------


def test_lovasz_weight_schedule():
    model = tiny_model(warmup_loss=nn.CrossEntropyLoss(), warmup_epochs=3, ramp_epochs=1)
    assert [model.lovasz_weight(e) for e in range(6)] == [0, 0, 0, 0.5, 1, 1]
    hard = tiny_model(warmup_loss=nn.CrossEntropyLoss(), warmup_epochs=2)
    assert [hard.lovasz_weight(e) for e in range(4)] == [0, 0, 1, 1]
    assert tiny_model().lovasz_weight(0) == 1.0  # no warm-up loss: Lovász only


@pytest.mark.parametrize("epoch,expected", [(0, 10.0), (1, 10.0), (2, 7.0), (3, 4.0), (4, 1.0)])
def test_training_objective_mixes_losses(monkeypatch, epoch, expected):
    main, warm = SpyLoss(1.0), SpyLoss(10.0)
    model = tiny_model(loss=main, warmup_loss=warm, warmup_epochs=2, ramp_epochs=2)
    monkeypatch.setattr(LovaszSegmentationModule, "current_epoch", property(lambda self: epoch))
    loss = model.training_step(make_batch(), 0)
    assert loss.item() == pytest.approx(expected)
    weight = model.lovasz_weight(epoch)
    # a term with weight 0 is not evaluated
    assert len(main.calls) == (weight > 0) and len(warm.calls) == (weight < 1)


def test_schedule_needs_a_warmup_loss():
    with pytest.raises(ValueError, match="warmup_loss"):
        tiny_model(warmup_epochs=2)


@pytest.mark.parametrize("term", ["loss", "warmup_loss"])
@pytest.mark.parametrize("outputs", [{"num_classes": 2, "out_channels": 1}, {"multi_label": True}])
def test_softmax_cross_entropy_is_refused_for_sigmoid_outputs(term, outputs):
    """On one sigmoid channel ``nn.CrossEntropyLoss`` is 0 for any logits (a warm-up that learns
    nothing); on regions it would make overlapping regions exclusive."""
    logits = torch.randn(2, 1, 8, requires_grad=True)
    schedule = {"warmup_epochs": 1} if term == "warmup_loss" else {}
    with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
        tiny_model(**outputs, **{term: nn.CrossEntropyLoss()}, **schedule)
    with pytest.raises(ValueError, match="softmax over the channels"):
        call_loss(nn.CrossEntropyLoss(), logits, torch.ones(2, 1, 8), torch.ones(2, 1, 8), True)
    # the suggested replacement learns: a non-zero loss with a gradient
    model = tiny_model(**outputs, warmup_loss=nn.BCEWithLogitsLoss(), warmup_epochs=1)
    batch = make_batch(regions=3 if "multi_label" in outputs else None, num_classes=2)
    loss = model.training_step(batch, 0)
    assert loss.item() > 0.1


# -- mask handling ------------------------------------------------------------------------------


def test_mask_is_passed_to_a_loss_that_accepts_it():
    spy = SpyLoss()
    model = tiny_model(loss=spy)
    batch = make_batch()
    model.training_step(batch, 0)
    (call,) = spy.calls
    assert torch.equal(call["mask"], batch["mask"])
    assert torch.equal(call["target"], batch["label"])
    assert call["input"].dtype == torch.float32 and call["input"].shape == (2, 3, *S)


def test_loss_without_mask_argument_gets_label_only():
    spy = SpyLoss(with_mask=False)
    assert not accepts_mask(spy) and accepts_mask(LovaszHingeLoss())
    model = tiny_model(loss=spy)
    model.training_step(make_batch(), 0)
    assert len(spy.calls) == 1 and spy.calls[0]["mask"] is None


def test_cross_entropy_gets_ignored_voxels_as_ignore_index():
    model = tiny_model(loss=nn.CrossEntropyLoss())
    batch = make_batch()
    logits = torch.randn(2, 3, *S)
    got = call_loss(model.loss, logits, batch["label"], batch["mask"])
    valid = batch["mask"][:, 0].bool()
    per_voxel = nn.functional.cross_entropy(logits, batch["label"][:, 0].long(), reduction="none")
    assert float(got) == pytest.approx(float(per_voxel[valid].mean()), rel=1e-5)


# -- metrics ------------------------------------------------------------------------------------


def test_metric_excludes_masked_voxels():
    model = tiny_model(num_classes=3)
    batch = make_batch(num_classes=3)
    label, mask = batch["label"], batch["mask"]
    logits = torch.randn(2, 3, *S)
    model.update_metric(model.val_iou, logits, label, mask)
    per_class = model.val_iou.compute()

    pred = logits.argmax(1).numpy()
    target, valid = label[:, 0].long().numpy(), mask[:, 0].bool().numpy()
    expected = [iou_numpy(pred, target, valid, c) for c in range(3)]
    np.testing.assert_allclose(per_class.numpy(), expected, rtol=1e-6)
    # changing labels under the mask changes nothing
    model.val_iou.reset()
    other = label.clone()
    other[mask.expand_as(other) == 0] = 2
    model.update_metric(model.val_iou, logits, other, mask)
    torch.testing.assert_close(model.val_iou.compute(), per_class)
    # mean IoU leaves the background out by default
    assert float(model.mean_iou(per_class)) == pytest.approx(np.mean(expected[1:]))
    with_bg = tiny_model(num_classes=3, metric_include_background=True)
    assert float(with_bg.mean_iou(per_class)) == pytest.approx(np.mean(expected))


def test_mean_iou_skips_classes_with_empty_union():
    model = tiny_model(num_classes=4)
    assert float(model.mean_iou(torch.tensor([0.9, 0.5, math.nan, 0.7]))) == pytest.approx(0.6)


def test_metric_is_accumulated_over_batches():
    model = tiny_model(num_classes=3)
    batches = [make_batch(seed=s) for s in range(3)]
    logits = [torch.randn(2, 3, *S) for _ in batches]
    for b, lg in zip(batches, logits, strict=True):
        model.update_metric(model.val_iou, lg, b["label"], b["mask"])
    pred = torch.cat([lg.argmax(1) for lg in logits]).numpy()
    target = torch.cat([b["label"][:, 0] for b in batches]).long().numpy()
    valid = torch.cat([b["mask"][:, 0] for b in batches]).bool().numpy()
    expected = [iou_numpy(pred, target, valid, c) for c in range(3)]
    np.testing.assert_allclose(model.val_iou.compute().numpy(), expected, rtol=1e-6)


# -- multi-label and binary ---------------------------------------------------------------------


def test_multi_label_path():
    model = tiny_model(num_classes=3, multi_label=True, class_names=["TC", "WT", "ET"])
    assert isinstance(model.loss, LovaszCELoss) and model.loss.sigmoid
    batch = make_batch(regions=3)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)

    logits = torch.randn(2, 3, *S)
    pred = model.discretize(logits)
    assert torch.equal(pred, (torch.sigmoid(logits) > 0.5).long())
    model.update_metric(model.val_iou, logits, batch["label"], batch["mask"])
    per_class = model.val_iou.compute()
    valid = batch["mask"][:, 0].bool().numpy()
    for c in range(3):
        p, t = pred[:, c].numpy().astype(bool), batch["label"][:, c].numpy().astype(bool)
        assert float(per_class[c]) == pytest.approx(iou_numpy(p, t, valid, True), rel=1e-6)
    # no background channel: every region enters the mean
    assert float(model.mean_iou(per_class)) == pytest.approx(float(per_class.mean()))

    out = model.predict_step({"image": batch["image"]}, 0)
    assert out.shape == (2, 3, *S) and out.dtype == torch.uint8


@pytest.mark.parametrize(("num_classes", "dtype"), [(256, torch.uint8), (301, torch.int16)])
def test_predicted_class_indices_never_wrap(num_classes, dtype):
    """The last class, 255 or 300, comes out as itself (a uint8 300 would read 44)."""
    network = nn.Conv3d(1, num_classes, 1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.copy_(torch.arange(num_classes, dtype=torch.float32))  # the last one wins
    model = tiny_model(num_classes=num_classes, network=network, roi_size=(8, 8, 8))
    out = model.predict_step({"image": torch.randn(1, 1, 8, 8, 8)}, 0)
    assert out.dtype == dtype and out.unique().tolist() == [num_classes - 1]


def test_binary_one_channel_with_hinge():
    model = tiny_model(num_classes=2, out_channels=1, loss=LovaszHingeLoss())
    assert model.binary and model.network(torch.zeros(1, 1, *S)).shape[1] == 1
    batch = make_batch(num_classes=2)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    logits = torch.randn(2, 1, *S)
    assert torch.equal(model.discretize(logits), (logits > 0).long())
    model.update_metric(model.val_iou, logits, batch["label"], batch["mask"])
    per_class = model.val_iou.compute()
    pred, target = (logits[:, 0] > 0).long().numpy(), batch["label"][:, 0].long().numpy()
    valid = batch["mask"][:, 0].bool().numpy()
    assert float(per_class[1]) == pytest.approx(iou_numpy(pred, target, valid, 1), rel=1e-6)
    assert float(model.mean_iou(per_class)) == pytest.approx(float(per_class[1]))


# -- checks -------------------------------------------------------------------------------------


def test_bad_configuration_and_batches_raise():
    with pytest.raises(ValueError, match="out_channels"):
        tiny_model(num_classes=3, out_channels=1)
    with pytest.raises(ValueError, match="class_names"):
        tiny_model(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="overlap"):
        tiny_model(overlap=1.0)
    for roi_size in [(0, 0, 0), (-4, 4, 4), (8, 8, 8.5), ()]:
        with pytest.raises(ValueError, match="roi_size must be positive integer sizes"):
            tiny_model(roi_size=roi_size)
    for sw_batch_size in [0, float("nan"), 1.5]:
        with pytest.raises(ValueError, match="sw_batch_size must be an integer >= 1"):
            tiny_model(sw_batch_size=sw_batch_size)
    with pytest.raises(ValueError, match="sw_mode must be 'gaussian' or 'constant', got 'linear'"):
        tiny_model(sw_mode="linear")
    model = tiny_model()
    batch = make_batch()
    batch["image"] = torch.randn(2, 2, *S)
    with pytest.raises(ValueError, match="in_channels=1"):
        model.training_step(batch, 0)
    wrong = tiny_model(num_classes=3, network=UNet(3, 1, 2, (4, 8), (2,)))
    with pytest.raises(ValueError, match="out_channels=3"):
        wrong.training_step(make_batch(), 0)


def test_hparams_leave_out_python_modules():
    model = tiny_model(network=UNet(3, 1, 3, (4, 8), (2,)), loss=LovaszHingeLoss())
    assert "network" not in model.hparams and "loss" not in model.hparams
    assert model.hparams.num_classes == 3


# -- inside a Trainer ---------------------------------------------------------------------------


def test_validate_logs_mean_iou_of_the_sliding_window_predictions(tmp_path):
    """Whole volumes larger than roi_size: logged IoU equals a recomputation from predict."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=3, roi_size=(8, 8, 8), overlap=0.5)
    cases = [make_batch(batch=1, seed=s) for s in range(3)]
    cases = [{k: v[0] for k, v in c.items()} for c in cases]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.validate(model, DataLoader(cases, batch_size=1), verbose=False)
    preds = trainer.predict(model, DataLoader([{"image": c["image"]} for c in cases]))
    pred = torch.cat(preds)[:, 0].numpy()
    target = torch.stack([c["label"][0] for c in cases]).long().numpy()
    valid = torch.stack([c["mask"][0] for c in cases]).bool().numpy()
    expected = [iou_numpy(pred, target, valid, c) for c in range(3)]
    for c in range(3):
        assert metrics[f"val/IoU/class_{c}"] == pytest.approx(expected[c], rel=1e-5)
    assert metrics["val/mIoU"] == pytest.approx(np.nanmean(expected[1:]), rel=1e-5)
    assert np.isfinite(metrics["val/loss"])
    # test runs the same evaluation, logged under test/
    (tested,) = trainer.test(model, DataLoader(cases, batch_size=1), verbose=False)
    for key, value in metrics.items():
        assert tested[key.replace("val/", "test/")] == pytest.approx(value, rel=1e-6)


def test_finetune_lr_scale_applies_once_when_the_lovasz_phase_starts():
    """warmup 2 epochs, ramp 1: w = 0, 0, 0.5, 1, 1 -> the rate is scaled at epoch 2 only."""
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = tiny_model(
        warmup_loss=nn.CrossEntropyLoss(), warmup_epochs=2, ramp_epochs=1, finetune_lr_scale=0.1
    )
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader([make_batch(batch=1, seed=i) for i in range(2)], batch_size=None)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(model, train_dataloaders=loader)
    # the rate of each epoch's first step
    assert seen == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.05])
    for bad in (0.0, float("nan"), float("inf")):
        match = f"finetune_lr_scale must be finite and > 0, got {bad}"
        with pytest.raises(ValueError, match=match):
            tiny_model(finetune_lr_scale=bad)
