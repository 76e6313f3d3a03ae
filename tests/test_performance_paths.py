"""The fast paths of issue 4: numpy vs torch sort backends, compile-friendliness, lean autograd."""

import pytest
import torch

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai import functional as Fn
from lovasz_monai.functional import rows as row_kernels


def _torch_only(monkeypatch):
    monkeypatch.setattr(row_kernels, "_use_numpy_sort", lambda key: False)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch", [False, True])
def test_numpy_sort_path_equals_torch_sort_path(monkeypatch, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    errors = torch.rand(3, 4, 5, 7, generator=gen)
    labels = torch.rand(3, 4, 5, 7, generator=gen) < 0.3
    valid = torch.rand(3, 1, 5, 7, generator=gen) < 0.8
    valid[1] = False  # a volume without any valid voxel
    rows = (errors.flatten(1), labels.flatten(1), valid.expand_as(errors).flatten(1))
    errors = errors.clone()
    errors[0, 0, 0, :3] = -0.0  # the sign bit must not break the integer keys
    assert row_kernels._use_numpy_sort(errors.flatten(2))
    fast, fast_counts = Fn.lovasz_class_losses(errors, labels, valid, batch=batch)
    fast_w = Fn.lovasz_weights(*rows)
    _torch_only(monkeypatch)
    ref, ref_counts = Fn.lovasz_class_losses(errors, labels, valid, batch=batch)
    ref_w = Fn.lovasz_weights(*rows)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    assert torch.equal(fast_counts, ref_counts)
    # distinct errors (no ties, no -0.0): the weights themselves agree
    torch.testing.assert_close(fast_w, ref_w, rtol=0, atol=1e-7)


def test_numpy_sort_path_keeps_ties_value(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    errors = (torch.rand(2, 3, 50, generator=gen) * 4).round() / 4  # many ties
    labels = torch.rand(2, 3, 50, generator=gen) < 0.4
    fast = Fn.lovasz_class_losses(errors, labels)[0]
    _torch_only(monkeypatch)
    torch.testing.assert_close(fast, Fn.lovasz_class_losses(errors, labels)[0], rtol=0, atol=1e-6)


LOSSES = [
    (LovaszSoftmaxLoss, {"to_onehot_y": True}),
    (LovaszSoftmaxLoss, {"to_onehot_y": True, "batch": True, "ignore_index": 255}),
    (LovaszSoftmaxLoss, {"to_onehot_y": True, "method": "histogram"}),
    (LovaszSoftmaxLoss, {"sigmoid": True}),
    (LovaszHingeLoss, {"to_onehot_y": True}),
    (LovaszCELoss, {"to_onehot_y": True, "ignore_index": 255}),
]


def _inputs(loss_cls, kwargs):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=gen)
    labels[0, 0, 0] = 255
    if kwargs.get("sigmoid"):
        labels = (torch.rand(2, 3, 6, 6, 6, generator=gen) > 0.5).float()
    elif "ignore_index" not in kwargs:
        labels = labels.clamp_max(2)
    mask = torch.rand(2, 1, 6, 6, 6, generator=gen) > 0.2
    return logits, labels, mask


@pytest.mark.parametrize(("loss_cls", "kwargs"), LOSSES)
def test_compiles_without_graph_breaks(loss_cls, kwargs):
    """With validate=False the loss has static shapes and no data-dependent control flow."""
    torch._dynamo.reset()
    loss = loss_cls(validate=False, **kwargs)
    logits, labels, mask = _inputs(loss_cls, kwargs)
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    value = compiled(logits, labels, mask=mask)
    (grad,) = torch.autograd.grad(value, logits)
    eager = loss(logits, labels, mask=mask)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(value, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("loss_cls", "kwargs"), LOSSES[:5])
def test_backward_keeps_one_voxel_sized_tensor(loss_cls, kwargs):
    """Only the activation's own output and the Lovász derivative are saved: no sort outputs,
    no int64 permutations, no one-hot copies."""
    logits, labels, mask = _inputs(loss_cls, kwargs)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_cls(**kwargs)(logits, labels, mask=mask)
    large = {(dtype, ptr) for dtype, numel, ptr in saved if numel >= logits.numel()}
    assert all(dtype.is_floating_point for dtype, _ in large), saved
    activation = 0 if loss_cls is LovaszHingeLoss else 1  # softmax/sigmoid save their output
    assert len(large) <= activation + 1, saved
