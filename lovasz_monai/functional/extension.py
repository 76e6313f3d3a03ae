"""The Lovász extension of ``(N, P)`` rows of errors and its weights, with a known gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from lovasz_monai.functional.arguments import (
    DEFAULT_BINS,
    DEFAULT_CHUNK_ELEMENTS,
    LovaszSettings,
    Method,
)
from lovasz_monai.functional.rows import _check_rows, _key_and_foreground, lovasz_class_rows

__all__ = ["lovasz_extension", "lovasz_weights"]


class _KnownGradient(torch.autograd.Function):
    """Returns ``value`` (per row); backward gives ``source`` the gradient ``grad_source``
    scaled per row. Saves nothing but ``grad_source``."""

    @staticmethod
    def forward(ctx, source: Tensor, value: Tensor, grad_source: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad_source)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad_source,) = ctx.saved_tensors
        scale = grad_value.reshape(*grad_value.shape, *([1] * (grad_source.ndim - grad_value.ndim)))
        return grad_source * scale, None, None


def known_gradient(source: Tensor, value: Tensor, grad_source: Tensor) -> Tensor:
    """``value`` (``(R, C)`` losses computed without autograd), differentiable in ``source``
    with the known derivative ``grad_source`` (shape of ``source``) of each row's value: the
    one tensor backward keeps."""
    return _KnownGradient.apply(source, value, grad_source)


def _extension_rows(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    method: Method,
    bins: int,
    chunk_elements: int,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    """``(weights (N, P), losses (N,))`` of checked ``(N, P)`` rows, without autograd."""
    _check_rows(errors, labels, valid, validate)
    if valid is not None:
        valid = valid.bool()
    key, fg = _key_and_foreground(errors, labels, valid)
    with torch.no_grad():
        settings = LovaszSettings(method=method, bins=bins, chunk_elements=chunk_elements)
        weights, losses, _ = lovasz_class_rows(key[:, None], fg[:, None], settings)
    return weights[:, 0], losses


def lovasz_weights(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    validate: bool = True,
) -> Tensor:
    """Per-voxel Lovász weights ``w``: the extension of each row is ``(errors * w).sum(-1)``.

    Computed without autograd: the weights are constants of the loss.

    Args:
        errors: ``(N, P)`` finite non-negative errors, one row per (volume, class), ``P >= 1``.
        labels: ``(N, P)`` foreground indicators (bool or 0/1).
        valid: optional mask (bool or 0/1) broadcastable to ``(N, P)`` (e.g. ``(1, P)``);
            ``False`` voxels take part in nothing and get weight 0.
        method: ``"sort"`` (exact, one batched sort) or ``"histogram"`` (sort-free, ``O(P)``; the
            extension under an order that is exact up to ties within a bin: ``0 <= exact - value <
            max(errors) / bins`` for each row).
        bins: number of error bins of the histogram method.
        chunk_elements: the sort method processes at most this many elements at once (whole rows,
            at least one row), which bounds its temporaries.
        validate: check that ``errors`` are finite and non-negative and that ``labels`` and
            ``valid`` hold only 0 and 1 (a few host synchronisations); ``False`` checks only
            shapes and dtypes, for a caller that vouches for the values.

    Returns:
        ``(N, P)`` weights with the dtype of ``errors``.

    Example:
        >>> errors = torch.tensor([[0.9, 0.1, 0.6, 0.3]])
        >>> labels = torch.tensor([[1, 0, 0, 1]])
        >>> lovasz_weights(errors, labels)
        tensor([[0.5000, 0.0000, 0.1667, 0.3333]])

    Raises:
        TypeError: ``errors`` is not floating point.
        ValueError: on shape mismatches, rows without voxels, an unknown ``method`` or
            non-positive ``bins``, and (``validate``) negative, NaN or inf errors, labels or
            ``valid`` other than 0/1.
    """
    weights, _ = _extension_rows(errors, labels, valid, method, bins, chunk_elements, validate)
    return weights


def lovasz_extension(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    validate: bool = True,
) -> Tensor:
    """Lovász extension of the Jaccard loss of each row, differentiable in ``errors``.

    Args:
        errors: ``(N, P)`` finite non-negative errors, ``P >= 1``.
        labels: ``(N, P)`` foreground indicators (bool or 0/1).
        valid: optional mask (bool or 0/1) broadcastable to ``(N, P)``.
        method, bins, chunk_elements, validate: see :func:`lovasz_weights`.

    Returns:
        ``(N,)`` losses; the gradient with respect to ``errors`` is the weights.

    Example:
        >>> errors = torch.tensor([[0.9, 0.1, 0.6, 0.3]], requires_grad=True)
        >>> loss = lovasz_extension(errors, torch.tensor([[1, 0, 0, 1]]))
        >>> round(loss.item(), 4)
        0.65
        >>> loss.backward(); errors.grad
        tensor([[0.5000, 0.0000, 0.1667, 0.3333]])

    Raises:
        TypeError: ``errors`` is not floating point.
        ValueError: see :func:`lovasz_weights`.
    """
    weights, losses = _extension_rows(errors, labels, valid, method, bins, chunk_elements, validate)
    return known_gradient(errors, losses, weights)
