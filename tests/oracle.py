"""Independent oracles for the Lovász tests, written from the definitions (not from the library).

Two kinds of oracle live here:

* exact set-function oracles on tiny rows, in rational arithmetic (:class:`fractions.Fraction`):
  the Jaccard loss of a set of "wrong" voxels, the Lovász extension by the greedy formula and by
  the maximum over all orderings (the Jaccard loss is submodular, so both agree);
* a float64 reference of the losses in the style of Algorithm 1 of the paper: a plain Python loop
  over images and classes, ignored voxels removed by boolean indexing, one ``torch.sort`` per row
  and autograd through the sort (so its gradient is the paper's subgradient).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# exact set-function oracles (pure Python)
# ---------------------------------------------------------------------------------------------


def _keep(values: Sequence, valid: Sequence[bool] | None) -> list[int]:
    return [i for i in range(len(values)) if valid is None or bool(valid[i])]


def jaccard_loss(fg: Sequence[bool], wrong: Sequence[int] | set[int]) -> Fraction:
    """Jaccard loss of the set ``wrong`` of mispredicted voxels, from the definition.

    The prediction is the ground truth with the voxels of ``wrong`` flipped, so the intersection
    is ``fg \\ wrong`` and the union is ``fg ∪ (wrong ∩ bg)``:
    ``J(S) = 1 - |fg \\ S| / |fg ∪ (S ∩ bg)|``, ``J(∅) = 0``, and ``J(S) = 1`` for a non-empty
    ``S`` when there is no foreground (DESIGN.md).
    """
    wrong = set(wrong)
    if not wrong:
        return Fraction(0)
    foreground = {i for i, f in enumerate(fg) if f}
    if not foreground:
        return Fraction(1)
    wrong_background = {i for i in wrong if not fg[i]}
    intersection = foreground - wrong
    union = foreground | wrong_background
    return 1 - Fraction(len(intersection), len(union))


def greedy_extension(
    errors: Sequence[float], fg: Sequence[bool], valid: Sequence[bool] | None = None
) -> Fraction:
    """Lovász extension by the greedy formula: sort errors descending, sum e_(k) (J_k - J_{k-1}).

    Computed exactly (errors converted to fractions); ignored voxels are dropped first.
    """
    keep = _keep(errors, valid)
    e = [Fraction(float(errors[i])) for i in keep]
    f = [bool(fg[i]) for i in keep]
    order = sorted(range(len(e)), key=lambda i: e[i], reverse=True)
    total = Fraction(0)
    previous = Fraction(0)
    for k in range(1, len(order) + 1):
        current = jaccard_loss(f, order[:k])
        total += e[order[k - 1]] * (current - previous)
        previous = current
    return total


def greedy_weights(
    errors: Sequence[float], fg: Sequence[bool], valid: Sequence[bool] | None = None
) -> list[Fraction]:
    """The greedy increments ``J_k - J_{k-1}`` scattered back to voxel order (0 where ignored).

    Only meaningful for distinct errors (with ties the weights depend on the tie order).
    """
    keep = _keep(errors, valid)
    f = [bool(fg[i]) for i in keep]
    order = sorted(range(len(keep)), key=lambda i: float(errors[keep[i]]), reverse=True)
    weights = [Fraction(0)] * len(errors)
    previous = Fraction(0)
    for k in range(1, len(order) + 1):
        current = jaccard_loss(f, order[:k])
        weights[keep[order[k - 1]]] = current - previous
        previous = current
    return weights


def max_permutation_extension(
    errors: Sequence[float], fg: Sequence[bool], valid: Sequence[bool] | None = None
) -> Fraction:
    """Lovász extension as the maximum over all orderings of sum_k e_pi(k) (J_k - J_{k-1}).

    For a submodular set function (the Jaccard loss is one) the maximum is reached by the
    descending order, so this equals :func:`greedy_extension`. Rows of at most 8 voxels.
    """
    keep = _keep(errors, valid)
    if len(keep) > 8:
        raise ValueError("max_permutation_extension is for rows of at most 8 voxels")
    e = [Fraction(float(errors[i])) for i in keep]
    f = [bool(fg[i]) for i in keep]
    cache: dict[frozenset[int], Fraction] = {}

    def jac(subset: tuple[int, ...]) -> Fraction:
        key = frozenset(subset)
        if key not in cache:
            cache[key] = jaccard_loss(f, key)
        return cache[key]

    best = None
    for perm in itertools.permutations(range(len(e))):
        value = sum(
            (e[perm[k - 1]] * (jac(perm[:k]) - jac(perm[: k - 1])) for k in range(1, len(e) + 1)),
            Fraction(0),
        )
        best = value if best is None or value > best else best
    return Fraction(0) if best is None else best


# ---------------------------------------------------------------------------------------------
# float64 reference in the style of the paper's Algorithm 1
# ---------------------------------------------------------------------------------------------


def alg1_grad(gt_sorted: Tensor) -> Tensor:
    """Algorithm 1: the increments of the Jaccard loss along rows sorted by decreasing error."""
    gt = gt_sorted.to(torch.float64)
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
    return torch.dot(e_sorted, alg1_grad(gt[perm]))


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


def fractions_to_tensor(values: Sequence[Fraction]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
