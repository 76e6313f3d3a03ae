"""The loss equivalences on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IGNORE = 255
DEVICE = "cuda"

LOSSES = {
    "softmax": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, **kw),
    "softmax_all_nobg": lambda **kw: LovaszSoftmaxLoss(
        to_onehot_y=True, classes="all", include_background=False, **kw
    ),
    "histogram": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, method="histogram", **kw),
    "sigmoid": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, sigmoid=True, **kw),
    "hinge": lambda **kw: LovaszHingeLoss(to_onehot_y=True, **kw),
    "ce": lambda **kw: LovaszCELoss(to_onehot_y=True, **kw),
}


def _case(seed=0, batch=2, channels=3, spatial=(6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, channels, *spatial, generator=g) * 2
    labels = torch.randint(0, channels, (batch, 1, *spatial), generator=g)
    valid = torch.rand(batch, 1, *spatial, generator=g) > 0.3
    valid.view(batch, -1)[:, 0] = True
    labels_ignored = torch.where(valid, labels, torch.full_like(labels, IGNORE))
    return logits, labels, labels_ignored, valid


def _value_and_grad(loss, logits, *args):
    x = logits.detach().clone().requires_grad_(True)
    value = loss(x, *args)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_cuda_matches_cpu(name, batch):
    logits, _, labels_ignored, _ = _case(1)
    loss = LOSSES[name](batch=batch, ignore_index=IGNORE)
    cpu_value, cpu_grad = _value_and_grad(loss, logits, labels_ignored)
    loss = loss.to(DEVICE)
    value, grad = _value_and_grad(loss, logits.to(DEVICE), labels_ignored.to(DEVICE))
    assert value.device.type == "cuda"
    torch.testing.assert_close(value.cpu(), cpu_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "histogram", "hinge", "ce"])
def test_cuda_ignore_equals_removal(name):
    logits, _, labels_ignored, valid = _case(2)
    logits, labels_ignored, valid = (t.to(DEVICE) for t in (logits, labels_ignored, valid))
    value = LOSSES[name](batch=True, ignore_index=IGNORE)(logits, labels_ignored)
    keep = valid.flatten(2)[:, 0]
    xs = torch.cat([logits[b].flatten(1)[:, keep[b]] for b in range(2)], 1)[None, ..., None]
    ys = torch.cat([labels_ignored[b].flatten(1)[:, keep[b]] for b in range(2)], 1)[None, ..., None]
    torch.testing.assert_close(value, LOSSES[name]()(xs, ys), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_cuda_mask_equals_ignore(name, batch):
    logits, labels, labels_ignored, valid = _case(3)
    logits, labels, labels_ignored, valid = (
        t.to(DEVICE) for t in (logits, labels, labels_ignored, valid)
    )
    a, grad_a = _value_and_grad(
        LOSSES[name](batch=batch, ignore_index=IGNORE), logits, labels_ignored
    )
    b, grad_b = _value_and_grad(LOSSES[name](batch=batch), logits, labels, valid)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_finite(name, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 2, 8, 8, 8, device=DEVICE)
    _, _, labels_ignored, _ = _case(4, spatial=(8, 8, 8))
    labels_ignored = labels_ignored.to(DEVICE)
    loss = LOSSES[name](ignore_index=IGNORE)
    with torch.autocast("cuda", dtype=dtype):
        logits = conv(x)
        assert logits.dtype == dtype
        value = loss(logits, labels_ignored)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(
        value.detach(), loss(logits.detach().float(), labels_ignored), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_cuda_validate_false_does_not_synchronise(name, batch):
    logits, labels, labels_ignored, valid = _case(5)
    logits = logits.to(DEVICE).requires_grad_(True)
    labels_ignored, labels, valid = (t.to(DEVICE) for t in (labels_ignored, labels, valid))
    loss = LOSSES[name](batch=batch, ignore_index=IGNORE, validate=False).to(DEVICE)
    masked = LOSSES[name](batch=batch, validate=False).to(DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss(logits, labels_ignored)
        value = value + masked(logits, labels, valid)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    checked = LOSSES[name](batch=batch, ignore_index=IGNORE).to(DEVICE)(logits, labels_ignored)
    checked = checked + LOSSES[name](batch=batch).to(DEVICE)(logits, labels, valid)
    torch.testing.assert_close(value.detach(), checked.detach())
    assert torch.isfinite(logits.grad).all()
