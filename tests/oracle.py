"""Independent oracles for the Lovász tests, written from the definitions (not from the library).

Two kinds of oracle live here:

* exact set-function oracles on tiny rows, in rational arithmetic (:class:`fractions.Fraction`):
  the Jaccard loss of a set of "wrong" voxels, the Lovász extension by the greedy formula and by
  the maximum over all orderings (the Jaccard loss is submodular, so both agree);
* the float64 reference of the losses in the style of Algorithm 1 of the paper, re-exported from
  :mod:`lovasz_monai.tools.reference` (the benchmark's baseline too: one implementation). It
  imports nothing from the library; ``tests/functional/test_functional.py`` checks it against
  the exact oracles, which keeps the chain of evidence independent of the code under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from lovasz_monai.tools.reference import (
    alg1_extension,
    alg1_grad,
    ref_lovasz_hinge,
    ref_lovasz_multilabel,
    ref_lovasz_softmax,
    reference_class_losses,
    reference_lovasz,
)

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


__all__ = [
    "alg1_extension",
    "alg1_grad",
    "fractions_to_tensor",
    "greedy_extension",
    "greedy_weights",
    "jaccard_loss",
    "max_permutation_extension",
    "ref_lovasz_hinge",
    "ref_lovasz_multilabel",
    "ref_lovasz_softmax",
    "reference_class_losses",
    "reference_lovasz",
]


def fractions_to_tensor(values: Sequence[Fraction]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
