"""The fast paths of issue 4: numpy vs torch sort backends, compile-friendliness, lean autograd."""

import numpy as np
import pytest
import torch

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai import functional as Fn
from lovasz_monai.functional import class_losses as class_loss_kernels
from lovasz_monai.functional import rows as row_kernels
from tests.oracle import fractions_to_tensor, greedy_extension, greedy_weights


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


def _few_classes_present(seed: int, num_classes: int = 9, present: int = 3):
    """Logits, a label map where each of 2 volumes holds ``present`` of ``num_classes`` classes,
    and a mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 5, 6, 4, generator=gen, dtype=torch.float64)
    picks = torch.randint(0, present, (2, 1, 5, 6, 4), generator=gen)
    chosen = torch.stack([torch.randperm(num_classes, generator=gen)[:present] for _ in range(2)])
    labels = torch.stack([chosen[b][picks[b]] for b in range(2)])
    mask = torch.rand(2, 1, 5, 6, 4, generator=gen) > 0.2
    return logits.requires_grad_(True), labels, mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("method", ["sort", "histogram"])
@pytest.mark.parametrize("kind", ["probability", "hinge", "errors"])
def test_skip_absent_keeps_present_rows_and_their_gradient(seed, batch, method, kind):
    """Rows without foreground are skipped: the present rows' losses, the counts and the
    gradient of the present-class mean are those of the full computation."""
    logits, labels, mask = _few_classes_present(seed)
    onehot = torch.nn.functional.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1)
    sources = {
        "probability": (lambda: logits.softmax(1), Fn.lovasz_probability_class_losses),
        "hinge": (lambda: logits, Fn.lovasz_hinge_class_losses),
        "errors": (lambda: (onehot - logits.softmax(1)).abs(), Fn.lovasz_class_losses),
    }
    make_source, class_losses = sources[kind]
    outcome = []
    for skip in (False, True):
        losses, counts = class_losses(
            make_source(), onehot, mask, batch, method, skip_absent=skip, bins=64
        )
        (grad,) = torch.autograd.grad(Fn.average_class_losses(losses, counts).sum(), logits)
        outcome.append((losses.detach(), counts, grad))
    (full, full_counts, full_grad), (skipped, counts, grad) = outcome
    present = counts > 0
    assert not present.all() and present.any()  # both kinds of rows occur
    assert torch.equal(counts, full_counts)
    torch.testing.assert_close(skipped[present], full[present], rtol=0, atol=1e-12)
    assert torch.all(skipped[~present] == 0)
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-12)


def _rows_reaching_the_sort(monkeypatch) -> list[int]:
    """The list fills with the number of rows of every call of the exact sort."""
    sorted_rows: list[int] = []
    sort = row_kernels._class_rows_by_sort

    def counting_sort(key, fg, **kwargs):
        sorted_rows.append(key.shape[0])
        return sort(key, fg, **kwargs)

    monkeypatch.setattr(row_kernels, "_class_rows_by_sort", counting_sort)
    return sorted_rows


def test_skip_absent_sorts_only_the_present_rows(monkeypatch):
    """The saving is real: only rows with foreground reach the sort."""
    sorted_rows = _rows_reaching_the_sort(monkeypatch)
    logits, labels, _ = _few_classes_present(0, num_classes=9, present=3)
    LovaszSoftmaxLoss(to_onehot_y=True)(logits, labels)
    LovaszSoftmaxLoss(to_onehot_y=True, batch=True)(logits, labels)
    LovaszSoftmaxLoss(to_onehot_y=True, classes="all")(logits, labels)
    LovaszSoftmaxLoss(to_onehot_y=True, validate=False)(logits, labels)  # CPU: skipped too
    Fn.lovasz_softmax(logits.softmax(1), labels)
    present_rows = sum(len(volume.unique()) for volume in labels)
    assert sorted_rows == [present_rows, len(labels.unique()), 2 * 9, present_rows, present_rows]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("kind", ["probability", "hinge", "errors"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_skip_absent_computes_in_place_when_most_rows_are_present(
    monkeypatch, batch, kind, masked, strided
):
    """With most rows present and the cut on (float32 on the CPU, a contiguous source), every
    row is computed in place and the absent rows are cleared afterwards; a strided source takes
    the copies of the present rows. Both give the losses, counts and gradient of the copy path
    and of the full computation."""
    monkeypatch.setattr(row_kernels, "_PRUNED_ROW_VOXELS", 1)
    sorted_rows = _rows_reaching_the_sort(monkeypatch)
    logits64, labels, mask = _few_classes_present(4, num_classes=9, present=6)
    mask = mask if masked else None
    onehot = torch.nn.functional.one_hot(labels[:, 0], 9).movedim(-1, 1)
    onehot = onehot if strided else onehot.contiguous()
    class_losses = {
        "probability": (lambda x: x.softmax(1), Fn.lovasz_probability_class_losses),
        "hinge": (lambda x: x, Fn.lovasz_hinge_class_losses),
        "errors": (lambda x: (onehot - x.softmax(1)).abs(), Fn.lovasz_class_losses),
    }
    make_source, losses_of = class_losses[kind]

    def outcome(skip: bool):
        logits = logits64.detach().float()
        if strided:
            logits = logits.movedim(1, -1).contiguous().movedim(-1, 1)
        logits.requires_grad_(True)
        source = make_source(logits)
        contiguous.append(source.is_contiguous())
        losses, counts = losses_of(source, onehot, mask, batch, skip_absent=skip)
        (grad,) = torch.autograd.grad(Fn.average_class_losses(losses, counts).sum(), logits)
        return losses.detach(), counts, grad

    contiguous: list[bool] = []
    chosen = outcome(True)
    monkeypatch.setattr(class_loss_kernels, "_computes_every_row", lambda *args: False)
    copies = outcome(True)
    full_losses, full_counts, full_grad = outcome(False)
    present = full_counts > 0
    assert not present.all() and 2 * present.sum() >= present.numel()
    # softmax returns contiguous probabilities of strided logits; the others keep the strides
    assert contiguous[0] == (not strided or kind == "probability")
    first = present.numel() if contiguous[0] else int(present.sum())
    assert sorted_rows == [first, int(present.sum()), present.numel()]
    for losses, counts, grad in (chosen, copies):
        assert torch.equal(counts, full_counts)
        assert torch.all(losses[~present] == 0)
        torch.testing.assert_close(losses[present], full_losses[present], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [False, True])
def test_present_classes_loss_matches_the_reference_loop_with_absent_classes(batch):
    """The loss class (which skips absent rows) against the benchmark's independent per-class
    loop, value and gradient, when most classes are absent."""
    from lovasz_monai.tools.benchmark import reference_lovasz_softmax

    logits, labels, _ = _few_classes_present(1, num_classes=12, present=4)
    value = LovaszSoftmaxLoss(to_onehot_y=True, batch=batch)(logits, labels)
    (grad,) = torch.autograd.grad(value, logits)
    expected = reference_lovasz_softmax(logits, labels, per_volume=not batch, classes="present")
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def _threads_on_every_input(monkeypatch) -> list[int]:
    """Threaded packing and sorting forced on any input size; the list fills with the thread
    count of every pool the row kernels start."""
    monkeypatch.setattr(row_kernels, "_THREADED_SORT_ELEMENTS", 0)
    used: list[int] = []
    pool = row_kernels.ThreadPoolExecutor
    monkeypatch.setattr(row_kernels, "ThreadPoolExecutor", lambda n: used.append(n) or pool(n))
    return used


@pytest.mark.parametrize("batch", [False, True])
def test_threaded_numpy_sort_equals_torch_sort(monkeypatch, batch):
    """Large inputs are packed and sorted in several threads, a share of the rows each (here
    forced on small rows and 3 threads, so that the shares are uneven): the same losses, counts
    and gradient as the single-threaded torch path."""
    gen = torch.Generator().manual_seed(7)
    probs = torch.rand(3, 5, 6, 7, generator=gen).softmax(1).requires_grad_(True)
    labels = torch.rand(3, 5, 6, 7, generator=gen) < 0.3
    valid = torch.rand(3, 1, 6, 7, generator=gen) < 0.8
    threads = torch.get_num_threads()
    used = _threads_on_every_input(monkeypatch)
    try:
        torch.set_num_threads(3)
        fast, fast_counts = Fn.lovasz_probability_class_losses(probs, labels, valid, batch=batch)
        (fast_grad,) = torch.autograd.grad(fast.sum(), probs)
    finally:
        torch.set_num_threads(threads)
    assert used == [3]
    _torch_only(monkeypatch)
    ref, ref_counts = Fn.lovasz_probability_class_losses(probs, labels, valid, batch=batch)
    (ref_grad,) = torch.autograd.grad(ref.sum(), probs)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    assert torch.equal(fast_counts, ref_counts)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=0, atol=1e-6)


def _whole_sort(monkeypatch):
    monkeypatch.setattr(row_kernels, "_PRUNED_ROW_VOXELS", 1 << 62)


def _pruned_sort(monkeypatch, fraction: float = row_kernels._PRUNED_FRACTION):
    monkeypatch.setattr(row_kernels, "_PRUNED_ROW_VOXELS", 1)
    monkeypatch.setattr(row_kernels, "_PRUNED_FRACTION", fraction)


def _rows(seed: int, levels: int, layout_batch: bool):
    """``(key, fg)`` class rows with ties (``levels`` error values), ignored voxels, a row
    without foreground, a row that keeps most of its voxels (row 1: 95% foreground, none
    ignored), a row of ignored voxels only, and (``layout_batch``) the non-contiguous
    ``(C, B, P)`` view of the batch layout."""
    gen = torch.Generator().manual_seed(seed)
    num_rows, segments, voxels = 5, 3, 41
    key = torch.randint(0, levels, (num_rows, segments, voxels), generator=gen) / levels
    fg = torch.rand(num_rows, segments, voxels, generator=gen) < 0.2
    fg[0] = False
    fg[1] = torch.rand(segments, voxels, generator=gen) < 0.95
    ignored = torch.rand(num_rows, segments, voxels, generator=gen) < 0.3
    ignored[1] = False
    ignored[-1] = True
    key[ignored], fg = -1.0, fg & ~ignored
    if layout_batch:
        key = key.transpose(0, 1).contiguous().transpose(0, 1)
        fg = fg.transpose(0, 1).contiguous().transpose(0, 1)
    return key, fg


@pytest.mark.parametrize("levels", [2, 7, 1000])
@pytest.mark.parametrize("layout_batch", [False, True])
@pytest.mark.parametrize("wrt_source", [False, True])
@pytest.mark.parametrize("fraction", [row_kernels._PRUNED_FRACTION, 1.0])
@pytest.mark.parametrize("overwrite_key, chunk_elements", [(False, 1 << 21), (True, 100)])
def test_pruned_sort_equals_the_whole_sort(
    monkeypatch, levels, layout_batch, wrt_source, fraction, overwrite_key, chunk_elements
):
    """Voxels past the last foreground voxel of a sorted row (or past the first largest error
    of a row without foreground) weigh 0, so leaving them out of the sort changes no weight,
    count or loss, ties, ignored voxels and non-contiguous rows included; and it does leave
    voxels out. Rows that keep more than ``_PRUNED_FRACTION`` are sorted whole, next to pruned
    rows (1.0: every row is gathered); with ``overwrite_key`` and small chunks the weights are
    written over the keys chunk by chunk."""
    key, fg = _rows(levels, levels, layout_batch)

    def weights_losses_counts(overwrite: bool, chunk: int):
        return row_kernels._class_rows_by_sort(
            key.clone(), fg, chunk_elements=chunk, wrt_source=wrt_source, overwrite_key=overwrite
        )

    _pruned_sort(monkeypatch, fraction)
    pruned = weights_losses_counts(overwrite_key, chunk_elements)
    keep, kept = row_kernels._weighted_voxels(key, fg)
    _whole_sort(monkeypatch)
    whole = weights_losses_counts(False, 1 << 21)
    assert torch.equal(pruned[0], whole[0]) and torch.equal(pruned[2], whole[2])
    torch.testing.assert_close(pruned[1], whole[1], rtol=0, atol=1e-6)
    assert (kept[[0, 2, 3, 4]] < key[0].numel()).all()  # ignored voxels are never kept
    # the row without foreground keeps and weighs its first largest error only, ties or not;
    # the ignored row nothing; row 1 is sorted whole unless every row is gathered
    first = (key[0] == key[0].max()).flatten().nonzero()[0]
    assert kept[0] == 1 and np.flatnonzero(keep[0]).tolist() == first.tolist()
    assert torch.equal(pruned[0][0].flatten().nonzero()[0], first)
    assert not pruned[0][-1].any() and pruned[1][-1] == 0 and kept[-1] == 0
    assert kept[1] == key[1].numel() or fraction == 1.0


def test_pruned_sort_matches_the_greedy_oracle(monkeypatch):
    """The pruned sort against the exact greedy Lovász extension and its weights, row by row
    (distinct errors, ignored voxels)."""
    gen = torch.Generator().manual_seed(3)
    errors = torch.rand(4, 37, generator=gen)
    labels = torch.rand(4, 37, generator=gen) < 0.3
    valid = torch.rand(4, 37, generator=gen) < 0.8
    _pruned_sort(monkeypatch)
    losses = Fn.lovasz_extension(errors, labels, valid)
    weights = Fn.lovasz_weights(errors, labels, valid)
    for row in range(4):
        args = (errors[row].tolist(), labels[row].tolist(), valid[row].tolist())
        assert losses[row].item() == pytest.approx(float(greedy_extension(*args)), abs=1e-6)
        expected = fractions_to_tensor(greedy_weights(*args)).float()
        torch.testing.assert_close(weights[row], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_pruned_threaded_sort_gradient_equals_torch_sort(monkeypatch, batch, classes):
    """Rows long enough to be pruned (64 x 64 x 8 voxels), sorted in 2 threads, against the
    single-threaded torch sort: the same loss and gradient of Lovász-Softmax, classes absent
    from a volume included."""
    gen = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(2, 6, 64, 64, 8, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, 6, (2, 1, 64, 64, 8), generator=gen)
    labels[0, :, :32] = 0  # class 5 absent from volume 0, and its other classes in half of it
    labels[0][labels[0] == 5] = 4
    threads = torch.get_num_threads()
    used = _threads_on_every_input(monkeypatch)
    try:
        torch.set_num_threads(2)
        fast = Fn.lovasz_softmax(logits.softmax(1), labels, classes=classes, batch=batch)
        (fast_grad,) = torch.autograd.grad(fast.sum(), logits)
    finally:
        torch.set_num_threads(threads)
    assert len(used) >= 2 and set(used) == {2}  # the cut, then the sorts
    _torch_only(monkeypatch)
    ref = Fn.lovasz_softmax(logits.softmax(1), labels, classes=classes, batch=batch)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=0, atol=1e-7)
