"""Unit tests of lovasz_monai.functional against the exact oracles of tests/oracle.py."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from lovasz_monai import functional as Fn
from tests.oracle import (
    alg1_extension,
    fractions_to_tensor,
    greedy_extension,
    greedy_weights,
    jaccard_loss,
    max_permutation_extension,
    ref_lovasz_hinge,
    ref_lovasz_multilabel,
    ref_lovasz_softmax,
    reference_class_losses,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_rows(seed, num_rows, num_voxels, ties=False, with_valid=False):
    """Rows of errors (distinct, or drawn from a few values to force ties), labels and validity."""
    g = _gen(seed)
    if ties:
        levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
        errors = levels[torch.randint(0, len(levels), (num_rows, num_voxels), generator=g)]
    else:
        errors = torch.rand(num_rows, num_voxels, generator=g, dtype=F64)
    labels = torch.rand(num_rows, num_voxels, generator=g) < 0.4
    valid = torch.rand(num_rows, num_voxels, generator=g) < 0.75 if with_valid else None
    return errors, labels, valid


def _row_oracle(fn, errors, labels, valid):
    out = []
    for r in range(errors.shape[0]):
        v = None if valid is None else valid[r].tolist()
        out.append(fn(errors[r].tolist(), labels[r].tolist(), v))
    return out


# --------------------------------------------------------------------------------------------
# the oracle itself
# --------------------------------------------------------------------------------------------


def test_oracle_jaccard_definition():
    fg = [True, False, True, False]
    assert jaccard_loss(fg, []) == 0
    # wrong = {0}: intersection {2}, union {0, 2} -> 1 - 1/2
    assert jaccard_loss(fg, [0]) == Fraction(1, 2)
    # wrong = {1}: intersection {0, 2}, union {0, 1, 2} -> 1 - 2/3
    assert jaccard_loss(fg, [1]) == Fraction(1, 3)
    assert jaccard_loss(fg, [0, 2]) == 1
    assert jaccard_loss([False, False], [1]) == 1  # no foreground: any mistake costs 1
    assert jaccard_loss([False, False], []) == 0


@pytest.mark.parametrize("seed", range(3))
def test_oracle_greedy_equals_max_over_permutations(seed):
    rng = random.Random(seed)
    for _ in range(10):
        n = rng.randint(1, 6)
        errors = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        fg = [rng.random() < 0.4 for _ in range(n)]
        valid = [rng.random() < 0.8 for _ in range(n)]
        expected = greedy_extension(errors, fg, valid)
        assert expected == max_permutation_extension(errors, fg, valid)
        # the Algorithm-1 reference (lovasz_monai.tools.reference) that the loss tests and the
        # benchmark use agrees with the exact oracle: its evidence is not the library under test
        keep = [i for i in range(n) if valid[i]]
        got = alg1_extension(
            torch.tensor([errors[i] for i in keep], dtype=F64),
            torch.tensor([fg[i] for i in keep], dtype=torch.bool),
        )
        assert got.item() == pytest.approx(float(expected), abs=1e-12)


# --------------------------------------------------------------------------------------------
# lovasz_grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fg", "expected"),
    [
        # G = 2. k=1 fg: J = 1 - 1/2 = 1/2; k=2 bg: J = 1 - 1/3 = 2/3 (+1/6);
        # k=3 fg: J = 1 - 0/3 = 1 (+1/3); k=4 bg: J stays 1 (+0)
        ([1, 0, 1, 0], [Fraction(1, 2), Fraction(1, 6), Fraction(1, 3), Fraction(0)]),
        # G = 2. bg: J = 1 - 2/3 = 1/3; fg: 1 - 1/3 = 2/3 (+1/3); bg: 1 - 1/4 = 3/4 (+1/12);
        # bg: 1 - 1/5 = 4/5 (+1/20); fg: 1 (+1/5).  1/3 + 1/3 + 1/12 + 1/20 + 1/5 = 1
        (
            [0, 1, 0, 0, 1],
            [Fraction(1, 3), Fraction(1, 3), Fraction(1, 12), Fraction(1, 20), Fraction(1, 5)],
        ),
        # G = 1. bg: 1 - 1/2 = 1/2; bg: 1 - 1/3 = 2/3 (+1/6); fg: 1 (+1/3)
        ([0, 0, 1], [Fraction(1, 2), Fraction(1, 6), Fraction(1, 3)]),
        # all foreground, G = 3: each foreground voxel adds 1/3
        ([1, 1, 1], [Fraction(1, 3)] * 3),
        # G = 0: the first mistake costs 1, the others nothing
        ([0, 0, 0], [Fraction(1), Fraction(0), Fraction(0)]),
        ([1], [Fraction(1)]),
        ([0], [Fraction(1)]),
    ],
)
@pytest.mark.parametrize("as_bool", [False, True])
def test_lovasz_grad_hand_computed(fg, expected, as_bool):
    t = torch.tensor(fg, dtype=torch.bool if as_bool else torch.int64)
    got = Fn.lovasz_grad(t, dtype=F64)
    assert got.dtype == F64
    torch.testing.assert_close(got, fractions_to_tensor(expected), rtol=0, atol=1e-15)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-14)
    assert Fn.lovasz_grad(t).dtype == torch.float32


def test_lovasz_grad_with_ignored_voxels():
    fg = torch.tensor([1, 0, 1, 0])
    # the ignored bg voxel (position 1) takes part in nothing: valid rows are fg, fg, bg with G=2:
    # fg: J = 1/2; fg: J = 1 (+1/2); bg: +0
    valid = torch.tensor([True, False, True, True])
    got = Fn.lovasz_grad(fg, valid, dtype=F64)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64))
    # ignored voxels at the end (where the sort puts them) leave the earlier weights unchanged
    valid_end = torch.tensor([True, True, True, False])
    got = Fn.lovasz_grad(torch.tensor([1, 0, 1, 1]), valid_end, dtype=F64)
    # G = 2 among the valid ones: fg 1/2, bg 1/6, fg 1/3, ignored 0
    torch.testing.assert_close(got, torch.tensor([1 / 2, 1 / 6, 1 / 3, 0.0], dtype=F64))


def test_lovasz_grad_all_ignored_and_batched_rows():
    fg = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]])
    valid = torch.tensor([[False] * 3, [True, True, False], [True, True, True]])
    got = Fn.lovasz_grad(fg, valid, dtype=F64)
    torch.testing.assert_close(got[0], torch.zeros(3, dtype=F64))  # all ignored -> zeros
    torch.testing.assert_close(got[1], torch.tensor([1.0, 0.0, 0.0], dtype=F64))  # G = 0
    torch.testing.assert_close(got[2], torch.tensor([0.5, 0.5, 0.0], dtype=F64))
    torch.testing.assert_close(got.sum(-1), torch.tensor([0.0, 1.0, 1.0], dtype=F64))


@pytest.mark.parametrize("seed", range(4))
def test_lovasz_grad_rows_sum_to_one_and_nonnegative(seed):
    g = _gen(seed)
    fg = torch.rand(6, 40, generator=g) < 0.3
    valid = torch.rand(6, 40, generator=g) < 0.8
    valid[0] = False
    w = Fn.lovasz_grad(fg, valid, dtype=F64)
    assert (w >= 0).all()
    expected = valid.any(-1).to(F64)
    torch.testing.assert_close(w.sum(-1), expected, rtol=0, atol=1e-12)
    assert (w[~valid] == 0).all()


def test_lovasz_grad_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        Fn.lovasz_grad(torch.tensor([1, 0]), torch.tensor([True, True, False]))


# --------------------------------------------------------------------------------------------
# lovasz_weights / lovasz_extension vs both oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_valid", [False, True])
def test_weights_match_greedy_oracle_distinct_errors(seed, with_valid):
    errors, labels, valid = _random_rows(seed, 8, 7, ties=False, with_valid=with_valid)
    w = Fn.lovasz_weights(errors, labels, valid)
    expected = torch.stack(
        [fractions_to_tensor(r) for r in _row_oracle(greedy_weights, errors, labels, valid)]
    )
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_valid", [False, True])
def test_extension_matches_both_oracles(seed, ties, with_valid):
    # rows of 6 voxels (and one of 7): 720 (5040) orderings each for the max-over-permutations form
    errors, labels, valid = _random_rows(seed, 4, 6, ties=ties, with_valid=with_valid)
    if seed == 0:
        errors, labels, valid = _random_rows(seed, 1, 7, ties=ties, with_valid=with_valid)
    greedy = _row_oracle(greedy_extension, errors, labels, valid)
    maxperm = _row_oracle(max_permutation_extension, errors, labels, valid)
    assert greedy == maxperm
    got = Fn.lovasz_extension(errors, labels, valid)
    torch.testing.assert_close(got, fractions_to_tensor(greedy), rtol=0, atol=1e-14)
    # float32 errors: the same to float32 precision
    got32 = Fn.lovasz_extension(errors.float(), labels, valid)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), fractions_to_tensor(greedy), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_extension_longer_rows_with_ties_vs_greedy(seed):
    errors, labels, valid = _random_rows(seed, 5, 30, ties=True, with_valid=True)
    expected = fractions_to_tensor(_row_oracle(greedy_extension, errors, labels, valid))
    torch.testing.assert_close(Fn.lovasz_extension(errors, labels, valid), expected)


def test_weights_hand_example_and_valid_broadcast():
    errors = torch.tensor([[0.9, 0.1, 0.6, 0.3], [0.2, 0.8, 0.5, 0.4]], dtype=F64)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    # row 0 sorted 0.9 fg, 0.6 bg, 0.3 fg, 0.1 bg (G=2): 1/2, 1/6, 1/3, 0
    w = Fn.lovasz_weights(errors, labels)
    torch.testing.assert_close(w[0], torch.tensor([1 / 2, 0, 1 / 6, 1 / 3], dtype=F64))
    # a (1, P) mask is shared by every row; voxel 2 dropped:
    # row 0: 0.9 fg, 0.3 fg, 0.1 bg -> 1/2, 1/2, 0
    # row 1: 0.8 fg, 0.4 bg, 0.2 bg (G=1) -> 1, 0, 0
    valid = torch.tensor([[True, True, False, True]])
    w = Fn.lovasz_weights(errors, labels, valid)
    torch.testing.assert_close(
        w, torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.0]], dtype=F64)
    )
    torch.testing.assert_close(w, Fn.lovasz_weights(errors, labels, valid.expand(2, 4)))


def test_weights_are_constants_and_extension_gradient_is_weights():
    errors, labels, valid = _random_rows(3, 4, 9, with_valid=True)
    errors = errors.clone().requires_grad_(True)
    w = Fn.lovasz_weights(errors, labels, valid)
    assert not w.requires_grad
    Fn.lovasz_extension(errors, labels, valid).sum().backward()
    torch.testing.assert_close(errors.grad, w)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("with_valid", [False, True])
def test_chunk_elements_gives_identical_results(chunk, with_valid):
    errors, labels, valid = _random_rows(11, 7, 5, with_valid=with_valid)
    ref = Fn.lovasz_weights(errors, labels, valid)
    got = Fn.lovasz_weights(errors, labels, valid, chunk_elements=chunk)
    assert torch.equal(got, ref)
    assert torch.equal(
        Fn.lovasz_extension(errors, labels, valid, chunk_elements=chunk),
        Fn.lovasz_extension(errors, labels, valid),
    )
    # with ties the weights may depend on the tie order but the value may not
    errors, labels, valid = _random_rows(12, 7, 5, ties=True, with_valid=with_valid)
    torch.testing.assert_close(
        Fn.lovasz_extension(errors, labels, valid, chunk_elements=chunk),
        Fn.lovasz_extension(errors, labels, valid),
        rtol=0,
        atol=1e-14,
    )


def test_weights_bad_arguments():
    errors = torch.rand(2, 4)
    labels = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="method"):
        Fn.lovasz_weights(errors, labels, method="quick")
    with pytest.raises(ValueError, match="bins"):
        Fn.lovasz_weights(errors, labels, method="histogram", bins=0)
    with pytest.raises(ValueError, match="labels"):
        Fn.lovasz_weights(errors, labels[:, :3])
    with pytest.raises(ValueError, match="rows"):
        Fn.lovasz_weights(errors[0], labels[0])


def test_weights_valid_of_incompatible_shape_raises_value_error():
    errors = torch.rand(2, 4)
    labels = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid"):
        Fn.lovasz_weights(errors, labels, torch.ones(3, 4, dtype=torch.bool))


def test_extension_gradcheck_float64():
    g = _gen(5)
    # distinct errors with gaps far above gradcheck's eps
    errors = (torch.randperm(12, generator=g).to(F64) / 12 + 0.01).view(2, 6).requires_grad_()
    labels = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 0]])
    valid = torch.tensor([[True, True, False, True, True, True]])
    assert torch.autograd.gradcheck(lambda e: Fn.lovasz_extension(e, labels), (errors,))
    assert torch.autograd.gradcheck(lambda e: Fn.lovasz_extension(e, labels, valid), (errors,))


# --------------------------------------------------------------------------------------------
# histogram method
# --------------------------------------------------------------------------------------------


def _check_histogram_bound(errors, labels, valid, bins):
    exact = Fn.lovasz_extension(errors, labels, valid)
    hist = Fn.lovasz_extension(errors, labels, valid, method="histogram", bins=bins)
    masked = errors if valid is None else torch.where(valid.expand_as(errors), errors, 0.0)
    width = masked.amax(-1) / bins
    diff = exact - hist
    rounding = 1e-12 if errors.dtype == F64 else 1e-6  # both values summed in the input dtype
    assert (diff >= -rounding).all(), diff
    assert (diff <= width * (1 + 1e-9) + rounding).all(), (diff, width)
    w = Fn.lovasz_weights(errors, labels, valid, method="histogram", bins=bins)
    assert (w >= 0).all()
    has_valid = torch.ones(errors.shape[0], dtype=torch.bool)
    if valid is not None:
        has_valid = valid.expand_as(errors).any(-1)
        assert (w[~valid.expand_as(errors)] == 0).all()
    atol = 1e-10 if w.dtype == F64 else 1e-5
    torch.testing.assert_close(w.sum(-1), has_valid.to(w.dtype), rtol=0, atol=atol)
    return diff


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [1, 4, 16, 256])
@pytest.mark.parametrize("with_valid", [False, True])
def test_histogram_within_bound_random(seed, bins, with_valid):
    errors, labels, valid = _random_rows(seed, 6, 60, with_valid=with_valid)
    labels[0] = False  # a row without foreground
    if valid is not None:
        valid[1] = False  # a row without any valid voxel
    _check_histogram_bound(errors, labels, valid, bins)
    _check_histogram_bound(errors.float(), labels, valid, bins)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [8, 64, 1024])
def test_histogram_within_bound_trained_model_like(seed, bins):
    # a well trained model: most errors tiny, a few large ones
    g = _gen(100 + seed)
    errors = torch.rand(4, 500, generator=g, dtype=F64) ** 8
    errors[:, :3] = torch.rand(4, 3, generator=g, dtype=F64) * 0.5 + 0.5
    labels = torch.rand(4, 500, generator=g) < 0.2
    valid = torch.rand(1, 500, generator=g) < 0.9
    _check_histogram_bound(errors, labels, None, bins)
    _check_histogram_bound(errors, labels, valid, bins)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [16, 100])
def test_histogram_exact_when_bins_hold_one_voxel(seed, bins):
    g = _gen(200 + seed)
    num_voxels = 9
    e_max = 0.8
    rows, labels = [], []
    for _ in range(5):
        # the largest error sits in bin 0, the others at the centres of distinct bins 1..bins-1
        centres = torch.randperm(bins - 1, generator=g)[: num_voxels - 1] + 1
        row = e_max * (1 - (centres.to(F64) + 0.5) / bins)
        row = torch.cat([torch.tensor([e_max], dtype=F64), row])
        perm = torch.randperm(num_voxels, generator=g)
        rows.append(row[perm])
        labels.append(torch.rand(num_voxels, generator=g) < 0.4)
    errors, labels = torch.stack(rows), torch.stack(labels)
    labels[0] = False
    exact_w = Fn.lovasz_weights(errors, labels)
    hist_w = Fn.lovasz_weights(errors, labels, method="histogram", bins=bins)
    # identical up to the last bit of rounding (the two closed forms divide in another order)
    torch.testing.assert_close(hist_w, exact_w, rtol=1e-15, atol=1e-17)
    torch.testing.assert_close(
        Fn.lovasz_extension(errors, labels, method="histogram", bins=bins),
        Fn.lovasz_extension(errors, labels),
        rtol=1e-15,
        atol=1e-17,
    )
    # float32 too
    torch.testing.assert_close(
        Fn.lovasz_weights(errors.float(), labels, method="histogram", bins=bins),
        Fn.lovasz_weights(errors.float(), labels),
        rtol=1e-6,
        atol=1e-9,
    )
    expected = fractions_to_tensor(_row_oracle(greedy_extension, errors, labels, None))
    torch.testing.assert_close(
        Fn.lovasz_extension(errors, labels, method="histogram", bins=bins),
        expected,
        rtol=0,
        atol=1e-14,
    )


@pytest.mark.parametrize("bins", [1, 4, 1024])
def test_histogram_zero_and_tiny_errors_take_part(bins):
    # a perfectly predicted foreground voxel (error 0) still counts in G: exact weights 1/2, 1/2
    # (0.5 bg: J = 1 - 1/2; 0.0 fg: J = 1), loss 0.25, and the histogram is exact here
    errors = torch.tensor([[0.5, 0.0]], dtype=F64)
    labels = torch.tensor([[0, 1]])
    exact_w = Fn.lovasz_weights(errors, labels)
    torch.testing.assert_close(exact_w, torch.tensor([[0.5, 0.5]], dtype=F64))
    hist_w = Fn.lovasz_weights(errors, labels, method="histogram", bins=bins)
    if bins > 1:  # the two voxels fall in the first and the last bin
        torch.testing.assert_close(hist_w, exact_w)
    else:  # one bin: foreground first -> weight 1 on the foreground voxel, loss 0
        torch.testing.assert_close(hist_w, torch.tensor([[0.0, 1.0]], dtype=F64))
    for dtype in (F64, torch.float32):
        # errors far below the bin width land in the last bin, not outside the histogram
        e = torch.tensor([[0.9, 1e-12, 0.0, 3e-9]], dtype=dtype)
        y = torch.tensor([[0, 1, 1, 0]])
        _check_histogram_bound(e, y, None, bins)
        _check_histogram_bound(e, y, torch.tensor([[True, True, True, False]]), bins)


@pytest.mark.parametrize("method", ["sort", "histogram"])
def test_non_contiguous_rows(method):
    # rows that are a transposed (strided) view, e.g. a flattened channels-last batch
    errors, labels, valid = _random_rows(9, 6, 4, with_valid=True)
    t_errors, t_labels, t_valid = errors.t().contiguous(), labels.t().contiguous(), valid.t()
    got = Fn.lovasz_weights(t_errors.t(), t_labels.t(), t_valid.contiguous().t(), method=method)
    torch.testing.assert_close(got, Fn.lovasz_weights(errors, labels, valid, method=method))
    got = Fn.lovasz_class_losses(
        errors.t().contiguous().t().view(2, 3, 4), labels.view(2, 3, 4), batch=True, method=method
    )[0]
    expected = Fn.lovasz_class_losses(
        errors.view(2, 3, 4).contiguous(), labels.view(2, 3, 4), batch=True, method=method
    )[0]
    torch.testing.assert_close(got, expected)


def test_histogram_single_bin_hand_computed():
    # one bin: foreground first, then the background voxels share the remaining increment.
    errors = torch.tensor([[0.9, 0.1, 0.6, 0.3]], dtype=F64)
    labels = torch.tensor([[1, 0, 0, 1]])
    # G = 2, fg weights 1/(G + 0) = 1/2 each; the two bg voxels share J(2, 2) - J(2, 0) = 0
    w = Fn.lovasz_weights(errors, labels, method="histogram", bins=1)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.0, 0.0, 0.5]], dtype=F64))
    # G = 0: the first (only) bin with background shares weight 1 between its 4 voxels
    w = Fn.lovasz_weights(errors, torch.zeros_like(labels), method="histogram", bins=1)
    torch.testing.assert_close(w, torch.full((1, 4), 0.25, dtype=F64))


# --------------------------------------------------------------------------------------------
# lovasz_class_losses / average_class_losses
# --------------------------------------------------------------------------------------------


def _volume(seed, shape=(3, 4, 5, 3), ties=False):
    g = _gen(seed)
    if ties:
        errors = torch.randint(0, 4, shape, generator=g).to(F64) / 4
    else:
        errors = torch.rand(shape, generator=g, dtype=F64)
    labels = torch.rand(shape, generator=g) < 0.3
    labels[0, 1] = False  # a (volume, class) row without foreground
    valid = torch.rand((shape[0], 1, *shape[2:]), generator=g) < 0.8
    return errors, labels, valid


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_class_losses_vs_oracle(batch, use_valid, ties):
    errors, labels, valid = _volume(7, ties=ties)
    v = valid if use_valid else None
    losses, counts = Fn.lovasz_class_losses(errors, labels, v, batch=batch)
    ref_losses, ref_counts = reference_class_losses(errors, labels, v, per_image=not batch)
    assert losses.shape == ((1, 4) if batch else (3, 4))
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts.long(), ref_counts)


def test_class_losses_batch_is_concatenation_and_per_volume_is_each_volume():
    errors, labels, valid = _volume(8, shape=(2, 3, 6))
    per_volume, _ = Fn.lovasz_class_losses(errors, labels, valid, batch=False)
    for b in range(2):
        alone, _ = Fn.lovasz_class_losses(errors[b : b + 1], labels[b : b + 1], valid[b : b + 1])
        torch.testing.assert_close(per_volume[b : b + 1], alone)
    batched, _ = Fn.lovasz_class_losses(errors, labels, valid, batch=True)
    cat = lambda x: torch.cat(list(x), dim=-1).unsqueeze(0)  # noqa: E731
    joined, _ = Fn.lovasz_class_losses(cat(errors), cat(labels), cat(valid))
    torch.testing.assert_close(batched, joined)
    # every row against the exact greedy oracle
    for b in range(2):
        for c in range(3):
            expected = greedy_extension(
                errors[b, c].tolist(), labels[b, c].tolist(), valid[b, 0].tolist()
            )
            assert per_volume[b, c].item() == pytest.approx(float(expected), abs=1e-13)


def test_class_losses_bad_shapes():
    errors = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        Fn.lovasz_class_losses(errors, torch.zeros(2, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must have shape"):
        Fn.lovasz_class_losses(errors, errors > 0.5, torch.ones(2, 3, 4, dtype=torch.bool))


def test_average_class_losses_by_hand():
    losses = torch.tensor([[0.2, 0.4, 0.9], [0.5, 0.1, 0.3]], dtype=F64)
    counts = torch.tensor([[3, 1, 0], [0, 0, 0]])
    # present: row 0 averages 0.2 and 0.4; row 1 has no class present -> 0
    torch.testing.assert_close(
        Fn.average_class_losses(losses, counts), torch.tensor([0.3, 0.0], dtype=F64)
    )
    # all: plain means
    torch.testing.assert_close(
        Fn.average_class_losses(losses, counts, present_only=False),
        torch.tensor([1.5 / 3, 0.9 / 3], dtype=F64),
    )
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    # present, weighted: (1 * 0.2 + 2 * 0.4) / 3; row 1: 0
    torch.testing.assert_close(
        Fn.average_class_losses(losses, counts, weight=weight),
        torch.tensor([1.0 / 3, 0.0], dtype=F64),
    )
    # all, weighted: (0.2 + 0.8 + 2.7) / 6 and (0.5 + 0.2 + 0.9) / 6
    torch.testing.assert_close(
        Fn.average_class_losses(losses, counts, present_only=False, weight=weight),
        torch.tensor([3.7 / 6, 1.6 / 6], dtype=F64),
    )
    # the only present classes weigh 0 -> 0, not NaN
    got = Fn.average_class_losses(losses, counts, weight=torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(got, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="weight"):
        Fn.average_class_losses(losses, counts, weight=torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        Fn.average_class_losses(losses, counts[:, :2])


# --------------------------------------------------------------------------------------------
# lovasz_softmax / lovasz_hinge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [0, 2]])
@pytest.mark.parametrize("ignore", [False, True])
def test_functional_lovasz_softmax_vs_reference(batch, classes, ignore):
    g = _gen(21)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=g, dtype=F64), 1)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0][labels[0] == 2] = 1  # class 2 absent from volume 0
    ref_labels = labels.clone()
    valid = None
    if ignore:
        valid = torch.rand(2, 1, 4, 5, generator=g) < 0.7
        ref_labels[~valid[:, 0]] = 255
    onehot = torch.stack([labels == c for c in range(3)], 1)
    got = Fn.lovasz_softmax(probs, onehot, valid, classes=classes, batch=batch)
    expected = ref_lovasz_softmax(
        probs, ref_labels, classes=classes, per_image=not batch, ignore=255 if ignore else None
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_functional_lovasz_softmax_hand_example_and_bad_classes():
    probs = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]], dtype=F64)
    labels = torch.tensor([[[1, 0], [0, 1]]])
    # class 0: errors 0.2 (fg), 0.3 (bg) -> 0.3 * 1/2 + 0.2 * 1/2 = 0.25
    # class 1: errors 0.3 (bg), 0.3 (fg), a tie -> 0.3 (either order) ; mean 0.275
    assert Fn.lovasz_softmax(probs, labels).item() == pytest.approx(0.275, abs=1e-15)
    with pytest.raises(ValueError, match="classes"):
        Fn.lovasz_softmax(probs, labels, classes="some")
    with pytest.raises(ValueError, match="classes"):
        Fn.lovasz_softmax(probs, labels, classes=[2])


@pytest.mark.parametrize("batch", [False, True])
def test_functional_lovasz_hinge_and_multilabel_vs_reference(batch):
    g = _gen(22)
    logits = torch.randn(2, 2, 3, 7, generator=g, dtype=F64) * 2
    labels = torch.rand(2, 2, 3, 7, generator=g) < 0.4
    labels[1, 0] = False
    valid = torch.rand(2, 1, 3, 7, generator=g) < 0.8
    got = Fn.lovasz_hinge(logits, labels, valid, batch=batch)
    expected = ref_lovasz_hinge(logits, labels, valid, per_image=not batch)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    probs = torch.sigmoid(logits)
    got = Fn.lovasz_softmax(probs, labels, valid, batch=batch, classes="all")
    expected = ref_lovasz_multilabel(probs, labels, valid, per_image=not batch, classes="all")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_functional_and_classes_agree_on_the_same_arguments(batch):
    """One vocabulary: ``batch`` means the same, with the same default, in both layers."""
    from lovasz_monai.losses import LovaszHingeLoss, LovaszSoftmaxLoss

    g = _gen(23)
    logits = torch.randn(3, 3, 4, 5, generator=g, dtype=F64)
    onehot = torch.stack([torch.randint(0, 3, (3, 4, 5), generator=g) == c for c in range(3)], 1)
    probs = torch.softmax(logits, 1)
    loss = LovaszSoftmaxLoss(softmax=False, batch=batch)
    torch.testing.assert_close(Fn.lovasz_softmax(probs, onehot, batch=batch), loss(probs, onehot))
    torch.testing.assert_close(
        Fn.lovasz_softmax(probs, onehot), LovaszSoftmaxLoss(softmax=False)(probs, onehot)
    )
    hinge = LovaszHingeLoss(batch=batch)
    torch.testing.assert_close(
        Fn.lovasz_hinge(logits, onehot, batch=batch), hinge(logits, onehot.double())
    )
    torch.testing.assert_close(
        Fn.lovasz_hinge(logits, onehot), LovaszHingeLoss()(logits, onehot.double())
    )


@pytest.mark.parametrize("per_volume", [False, True])
def test_functional_per_volume_is_deprecated_and_maps_to_not_batch(per_volume):
    g = _gen(24)
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=g, dtype=F64), 1)
    onehot = torch.stack([torch.randint(0, 3, (2, 4, 5), generator=g) == c for c in range(3)], 1)
    with pytest.warns(DeprecationWarning, match="per_volume"):
        old = Fn.lovasz_softmax(probs, onehot, per_volume=per_volume)
    torch.testing.assert_close(old, Fn.lovasz_softmax(probs, onehot, batch=not per_volume))
    with pytest.warns(DeprecationWarning, match="per_volume"):
        old = Fn.lovasz_hinge(probs, onehot, per_volume=per_volume)
    torch.testing.assert_close(old, Fn.lovasz_hinge(probs, onehot, batch=not per_volume))


def test_shared_argument_checker():
    assert Fn.check_lovasz_arguments(classes=(2, 1)) == [2, 1]
    for kwargs, match in [
        ({"classes": "some"}, "classes"),
        ({"classes": []}, "classes"),
        ({"method": "fast"}, "method"),
        ({"bins": 0}, "bins"),
        ({"chunk_elements": 0}, "chunk_elements"),
    ]:
        with pytest.raises(ValueError, match=match):
            Fn.check_lovasz_arguments(**kwargs)


def test_functional_lovasz_hinge_hand_example():
    # margins 1 - x s: [1 - 3, 1 - 0.5, 1 - 2, 1 + 0.2] -> errors [0, 0.5, 0, 1.2], G = 2
    # sorted: 1.2 bg (J = 1 - 2/3 = 1/3), 0.5 fg (J = 1 - 1/3 = 2/3, +1/3) -> (1.2 + 0.5) / 3
    logits = torch.tensor([[[3.0, 0.5, -2.0, 0.2]]], dtype=F64, requires_grad=True)
    labels = torch.tensor([[[1, 1, 0, 0]]])
    loss = Fn.lovasz_hinge(logits, labels)
    assert loss.item() == pytest.approx(1.7 / 3, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.0, -1 / 3, 0.0, 1 / 3]]], dtype=F64))


# -- target decoding (label maps, ignore labels, masks) -----------------------------------------


def test_decode_target_label_map_with_ignore_and_mask_by_hand():
    labels = torch.tensor([[[[0, 2], [255, 1]]], [[[1, 1], [0, 255]]]])  # (2, 1, 2, 2)
    mask = torch.tensor([[[[1, 0], [1, 1]]], [[[1, 1], [1, 1]]]], dtype=torch.uint8)
    fg, valid, decoded = Fn.decode_target(
        labels, (2, 3, 2, 2), mask, to_onehot_y=True, ignore_index=255
    )
    assert valid.tolist() == [[[[True, False], [False, True]]], [[[True, True], [True, False]]]]
    assert decoded.tolist() == [[[[0, 2], [0, 1]]], [[[1, 1], [0, 0]]]]  # ignored -> 0
    assert fg.dtype == torch.bool and fg.shape == (2, 3, 2, 2)
    assert fg[0, :, 0, 1].tolist() == [False, False, True]  # label 2
    assert fg[1, :, 0, 0].tolist() == [False, True, False]  # label 1
    assert torch.equal(fg.sum(1), torch.ones(2, 2, 2, dtype=torch.long))  # exactly one class


def test_decode_target_one_hot_and_binary_maps():
    onehot = torch.tensor([[[1, 0, 0], [0, 1, 1]]])  # (1, 2, 3)
    fg, valid, labels = Fn.decode_target(onehot, (1, 2, 3))
    assert torch.equal(fg, onehot.bool()) and valid is None and labels is None
    binary = torch.tensor([[[1.0, 0.0, 7.0]]])  # a 0/1 map with an ignore value 7
    fg, valid, labels = Fn.decode_target(binary, (1, 1, 3), ignore_index=7)
    assert fg.tolist() == [[[True, False, False]]] and valid.tolist() == [[[True, True, False]]]
    multi_hot = torch.tensor([[[1, 1], [1, 0]]])  # overlapping regions
    assert torch.equal(Fn.decode_target(multi_hot, (1, 2, 2), exclusive=False)[0], multi_hot.bool())


@pytest.mark.parametrize(
    ("target", "shape", "kwargs", "match"),
    [
        (torch.zeros(1, 1, 4), (1, 3, 5), {}, "label map .* or a .* one-hot target"),
        (torch.zeros(1, 1, 4), (1, 3, 4), {}, "pass to_onehot_y=True"),
        (torch.zeros(1, 3, 4), (1, 3, 4), {"to_onehot_y": True}, "expects a label map"),
        (torch.zeros(1, 3, 4), (1, 3, 4), {"ignore_index": 255}, "ignore_index applies"),
        (torch.full((1, 1, 4), 3), (1, 3, 4), {"to_onehot_y": True}, r"\[0, 3\).*\[3, 3\]"),
        (torch.full((1, 1, 4), 0.5), (1, 3, 4), {"to_onehot_y": True}, "fractional"),
        (torch.full((1, 2, 4), 2), (1, 2, 4), {}, "only 0 and 1"),
        (torch.ones(1, 2, 4), (1, 2, 4), {}, "exactly one class per voxel"),
    ],
)
def test_decode_target_errors(target, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fn.decode_target(target, shape, **kwargs)


def test_decode_target_mask_errors():
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, \*spatial\)"):
        Fn.decode_target(torch.zeros(1, 1, 4), (1, 1, 4), torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        Fn.decode_target(torch.zeros(1, 1, 4), (1, 1, 4), torch.full((1, 1, 4), 2))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        Fn.decode_target([0, 1], (1, 1, 2))


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_softmax_takes_a_label_map_and_ignore_index_like_the_reference(batch, classes):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (2, 1, 5, 6), generator=gen)
    labels[0, 0, :2] = 255
    value = Fn.lovasz_softmax(probs, labels, classes=classes, batch=batch, ignore_index=255)
    expected = ref_lovasz_softmax(
        probs, labels[:, 0], classes=classes, per_image=not batch, ignore=255
    )
    torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7)
    # the same as one-hot labels with the validity given explicitly
    valid = labels != 255
    onehot = torch.nn.functional.one_hot(labels[:, 0].clamp_max(3), 4).movedim(-1, 1)
    same = Fn.lovasz_softmax(probs, onehot, valid, classes=classes, batch=batch)
    torch.testing.assert_close(value, same)


def test_lovasz_hinge_takes_a_binary_map_with_ignore_index():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 1, 7, 5, generator=gen, dtype=torch.float64)
    labels = (torch.rand(2, 1, 7, 5, generator=gen) < 0.4).long()
    labels[1, 0, 3:] = 255
    value = Fn.lovasz_hinge(logits, labels, ignore_index=255)
    expected = ref_lovasz_hinge(logits, labels.clamp_max(1), valid=labels != 255)
    torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7)
