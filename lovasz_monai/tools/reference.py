"""Reference Lovász losses written straight from Algorithm 1 of Berman et al. (CVPR 2018).

One plain implementation, independent of :mod:`lovasz_monai.functional` (torch only): a Python
loop over images and classes, ignored voxels removed by boolean indexing, one ``torch.sort`` per
row and autograd through the sort (so its gradient is the paper's subgradient). The benchmark
times it as the "reference loop" baseline; the tests compare the library against it, and check
it against the exact set-function oracles of ``tests/oracle.py`` (rational arithmetic).

Computed in the dtype of the errors: float64 in the tests, float32 in the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "alg1_extension",
    "alg1_grad",
    "ref_lovasz_hinge",
    "ref_lovasz_multilabel",
    "ref_lovasz_softmax",
    "reference_class_losses",
    "reference_lovasz",
]


def alg1_grad(gt_sorted: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Algorithm 1: the increments of the Jaccard loss along rows sorted by decreasing error.

    Example:
        >>> alg1_grad(torch.tensor([1, 0, 1, 0]))
        tensor([0.5000, 0.1667, 0.3333, 0.0000], dtype=torch.float64)
    """
    gt = gt_sorted.to(dtype)
    num_fg = gt.sum()
    fg_cum = torch.cumsum(gt, 0)
    bg_cum = torch.cumsum(1.0 - gt, 0)
    jaccard = 1.0 - (num_fg - fg_cum) / (num_fg + bg_cum)
    return torch.diff(jaccard, prepend=jaccard.new_zeros(1))


def alg1_extension(errors: Tensor, gt: Tensor, hinge: bool = False) -> Tensor:
    """Extension of one 1-D row: sort, Alg. 1 gradient, dot product (autograd through sort).

    ``hinge``: ``errors`` are the margins ``1 - x * s``; sort them and apply relu after sorting,
    as the paper's hinge reference does.
    """
    if errors.numel() == 0:
        return errors.sum()
    e_sorted, perm = torch.sort(errors, descending=True)
    if hinge:
        e_sorted = torch.relu(e_sorted)
    return torch.dot(e_sorted, alg1_grad(gt[perm], e_sorted.dtype))


def _rows(x: Tensor, valid: Tensor | None, images: Sequence[int]) -> Tensor:
    """Valid voxels of the chosen images as ``(P, C)`` rows, by boolean indexing."""
    parts = []
    for b in images:
        flat = x[b].reshape(x.shape[1], -1).transpose(0, 1)
        if valid is not None:
            flat = flat[valid[b].reshape(-1).bool()]
        parts.append(flat)
    return torch.cat(parts, 0)


def reference_class_losses(
    errors: Tensor, fg: Tensor, valid: Tensor | None, per_image: bool, hinge: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-class extension of each image (or of the whole batch): ``(R, C)`` losses and counts."""
    groups = [[b] for b in range(errors.shape[0])] if per_image else [list(range(errors.shape[0]))]
    losses, counts = [], []
    for images in groups:
        e_rows = _rows(errors, valid, images)
        f_rows = _rows(fg, valid, images).bool()
        row_losses, row_counts = [], []
        for c in range(errors.shape[1]):
            row_losses.append(alg1_extension(e_rows[:, c], f_rows[:, c], hinge))
            row_counts.append(int(f_rows[:, c].sum()))
        losses.append(torch.stack(row_losses))
        counts.append(row_counts)
    return torch.stack(losses), torch.tensor(counts)


def _image_loss(
    e_rows: Tensor,
    f_rows: Tensor,
    classes: str | Sequence[int],
    channels: Sequence[int],
    weight: Sequence[float] | None,
    hinge: bool,
) -> Tensor:
    chosen = list(channels) if isinstance(classes, str) else list(classes)
    total = e_rows.sum() * 0.0
    weight_sum = 0.0
    for c in chosen:
        fg_c = f_rows[:, c]
        if classes == "present" and not bool(fg_c.any()):
            continue
        w = 1.0 if weight is None else float(weight[c])
        total = total + w * alg1_extension(e_rows[:, c], fg_c, hinge)
        weight_sum += w
    if weight_sum == 0:
        return e_rows.sum() * 0.0
    return total / weight_sum


def reference_lovasz(
    errors: Tensor,
    fg: Tensor,
    valid: Tensor | None = None,
    per_image: bool = False,
    classes: str | Sequence[int] = "present",
    channels: Sequence[int] | None = None,
    weight: Sequence[float] | None = None,
    hinge: bool = False,
) -> Tensor:
    """Reference Lovász loss from per-voxel errors (float64, autograd through the sort).

    Args:
        errors: ``(B, C, *S)`` errors (or hinge margins when ``hinge``).
        fg: ``(B, C, *S)`` foreground indicators (one-hot or multi-hot).
        valid: ``(B, 1, *S)`` bool or None; invalid voxels are removed by boolean indexing.
        per_image: mean over images of each image's loss, else the batch is one set of voxels.
        classes: "present", "all" or an explicit list of channels.
        channels: the channels averaged for "present"/"all" (default: all).
        weight: optional weight of each input channel in the class mean.
        hinge: the errors are margins; relu after sorting.
    """
    if channels is None:
        channels = range(errors.shape[1])
    groups = [[b] for b in range(errors.shape[0])] if per_image else [list(range(errors.shape[0]))]
    values = []
    for images in groups:
        e_rows = _rows(errors, valid, images)
        f_rows = _rows(fg, valid, images).bool()
        values.append(_image_loss(e_rows, f_rows, classes, channels, weight, hinge))
    return torch.stack(values).mean()


def ref_lovasz_softmax(
    probas: Tensor,
    labels: Tensor,
    classes: str | Sequence[int] = "present",
    per_image: bool = False,
    ignore: int | None = None,
    channels: Sequence[int] | None = None,
    weight: Sequence[float] | None = None,
) -> Tensor:
    """Multi-class Lovász-Softmax with the reference's API: probabilities ``(B, C, *S)``, integer
    labels ``(B, *S)``, ``ignore`` label."""
    num_classes = probas.shape[1]
    labels = labels.long()
    valid = None if ignore is None else (labels != ignore).unsqueeze(1)
    safe = labels if ignore is None else torch.where(labels == ignore, 0, labels)
    fg = torch.stack([safe == c for c in range(num_classes)], 1)
    errors = (fg.to(probas.dtype) - probas).abs()
    return reference_lovasz(errors, fg, valid, per_image, classes, channels, weight)


def ref_lovasz_multilabel(
    probas: Tensor,
    fg: Tensor,
    valid: Tensor | None = None,
    per_image: bool = False,
    classes: str | Sequence[int] = "present",
    channels: Sequence[int] | None = None,
    weight: Sequence[float] | None = None,
) -> Tensor:
    """Lovász-sigmoid: each channel an independent binary problem on probabilities."""
    fg = fg.bool()
    errors = (fg.to(probas.dtype) - probas).abs()
    return reference_lovasz(errors, fg, valid, per_image, classes, channels, weight)


def ref_lovasz_hinge(
    logits: Tensor,
    fg: Tensor,
    valid: Tensor | None = None,
    per_image: bool = True,
    classes: str | Sequence[int] = "all",
    channels: Sequence[int] | None = None,
    weight: Sequence[float] | None = None,
) -> Tensor:
    """Lovász hinge on ``(B, C, *S)`` logits and binary targets; margins sorted before relu."""
    fg = fg.bool()
    signs = 2.0 * fg.to(logits.dtype) - 1.0
    margins = 1.0 - logits * signs
    return reference_lovasz(margins, fg, valid, per_image, classes, channels, weight, hinge=True)
