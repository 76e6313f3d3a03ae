"""Tests of the benchmark module: the reference loop, the memory measurement and the CLI."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from monai.losses import DiceLoss

from lovasz_monai import LovaszSoftmaxLoss
from lovasz_monai.tools import benchmark
from lovasz_monai.tools.benchmark import (
    METHODS,
    Case,
    Settings,
    format_table,
    main,
    make_inputs,
    parse_sizes,
    reference_lovasz_softmax,
    run_case,
)
from lovasz_monai.tools.measure import peak_memory_bytes, time_fwd_bwd
from tests.oracle import greedy_extension


def _brute_force_lovasz(errors: list[float], fg: list[bool]) -> float:
    """Lovász extension of the Jaccard loss from its definition, with Python sets.

    ``sum_k e_(k) * (Delta(S_k) - Delta(S_{k-1}))`` where ``S_k`` holds the ``k`` largest errors
    and ``Delta(M) = |M| / |G u M|`` is the Jaccard loss of mispredicting ``M``.
    """
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    truth = {i for i, f in enumerate(fg) if f}

    def delta(mispredicted: set[int]) -> float:
        union = truth | mispredicted
        return len(mispredicted) / len(union) if union else 0.0

    total, previous, chosen = 0.0, 0.0, set()
    for i in order:
        chosen.add(i)
        current = delta(chosen)
        total += errors[i] * (current - previous)
        previous = current
    return total


def _brute_force_softmax(logits: torch.Tensor, labels: torch.Tensor, per_volume: bool) -> float:
    probs = torch.softmax(logits.double(), dim=1)
    groups = [slice(b, b + 1) for b in range(probs.shape[0])] if per_volume else [slice(None)]
    volume_losses = []
    for group in groups:
        p, lab = probs[group], labels[group]
        class_losses = []
        for c in range(probs.shape[1]):
            fg = (lab == c).flatten().tolist()
            if not any(fg):
                continue
            errors = [
                abs(float(f) - q) for f, q in zip(fg, p[:, c].flatten().tolist(), strict=True)
            ]
            class_losses.append(_brute_force_lovasz(errors, fg))
        volume_losses.append(sum(class_losses) / len(class_losses) if class_losses else 0.0)
    return sum(volume_losses) / len(volume_losses)


@pytest.mark.parametrize("seed, per_volume", itertools.product(range(4), (False, True)))
def test_reference_matches_brute_force(seed: int, per_volume: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 5, generator=generator) * 2
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=generator)
    labels[1] = labels[1].clamp(max=1)  # a class absent from one volume
    value = reference_lovasz_softmax(logits, labels, per_volume=per_volume)
    assert value.item() == pytest.approx(_brute_force_softmax(logits, labels, per_volume), abs=1e-5)


@pytest.mark.parametrize("batch", [True, False])
def test_reference_matches_our_loss_value_and_gradient(batch: bool) -> None:
    logits, labels = make_inputs(Case(2, 4, (6, 7, 5)), seed=3)
    labels[0][labels[0] == 3] = 0  # class 3 absent from the first volume
    ours = LovaszSoftmaxLoss(to_onehot_y=True, batch=batch)(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = reference_lovasz_softmax(logits, labels, per_volume=not batch)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-4)


def test_reference_all_classes_matches_kornia() -> None:
    kornia_losses = pytest.importorskip("kornia.losses")
    logits, labels = make_inputs(Case(2, 3, (5, 6)), seed=1)
    labels[1][labels[1] == 2] = 1  # absent class: enters "all" with its largest probability
    expected = kornia_losses.lovasz_softmax_loss(logits, labels[:, 0])
    value = reference_lovasz_softmax(logits, labels, per_volume=True, classes="all")
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)


def test_reference_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        reference_lovasz_softmax(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        reference_lovasz_softmax(
            torch.zeros(1, 2, 4), torch.zeros(1, 1, 4, dtype=torch.long), classes="some"
        )


def test_cpu_memory_measures_a_known_allocation() -> None:
    size = 100 * 2**20
    peak = peak_memory_bytes(lambda: torch.empty(size, dtype=torch.uint8), "cpu")
    assert size <= peak < size * 1.01

    def two_then_one() -> None:
        a = torch.empty(size // 2, dtype=torch.uint8)
        b = torch.empty(size // 4, dtype=torch.uint8)
        del a
        c = torch.empty(size // 8, dtype=torch.uint8)
        del b, c

    peak = peak_memory_bytes(two_then_one, "cpu")
    assert size * 3 // 4 <= peak < size * 3 // 4 * 1.01  # 50 + 25 MB alive at once


def test_cpu_memory_counts_numpy_allocations_on_the_same_timeline() -> None:
    np = pytest.importorskip("numpy")
    size = 40 * 2**20

    def overlapping() -> None:
        tensor = torch.empty(size, dtype=torch.uint8)
        array = np.ones(size // 2, dtype=np.uint8)
        del tensor, array

    def one_after_the_other() -> None:
        tensor = torch.empty(size, dtype=torch.uint8)
        del tensor
        array = np.ones(size // 2, dtype=np.uint8)
        del array

    peak = peak_memory_bytes(overlapping, "cpu")
    assert size * 3 // 2 <= peak < size * 3 // 2 * 1.01
    peak = peak_memory_bytes(one_after_the_other, "cpu")
    assert size <= peak < size * 1.01


def test_cpu_memory_ignores_tensors_allocated_before() -> None:
    before = torch.ones(50 * 2**20, dtype=torch.uint8)
    peak = peak_memory_bytes(lambda: before.add_(1), "cpu")  # in place: nothing new
    assert peak < 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_measures_a_known_allocation() -> None:
    size = 100 * 2**20
    peak = peak_memory_bytes(lambda: torch.empty(size, dtype=torch.uint8, device="cuda"), "cuda")
    assert size <= peak < size * 1.01


def test_parse_sizes() -> None:
    assert parse_sizes("8, 2x3x4x5", batch=1, classes=5) == [
        Case(1, 5, (8, 8, 8)),
        Case(2, 3, (4, 5)),
    ]
    for bad in ("", "2x3", "axb", "2x1x8", "0x3x8"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_time_fwd_bwd_counts_runs_and_leaves_no_gradient() -> None:
    logits, labels = make_inputs(Case(1, 2, (4, 4)))
    times = time_fwd_bwd(METHODS["dice"].make(Settings()), logits, labels, 3, 1)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert logits.grad is None
    with pytest.raises(ValueError):
        time_fwd_bwd(lambda x, y: x.sum(), logits, labels, repeats=0)


def _exact_lovasz_softmax(case: Case, seed: int, per_volume: bool) -> float:
    """The benchmark's quantity on ``make_inputs(case, seed)`` from the exact greedy oracle.

    Independent of ``lovasz_monai.tools.reference`` (the benchmark's "reference loop", which is
    also ``tests.oracle.ref_lovasz_softmax``): float64 softmax, then the Lovász extension of each
    present class by ``tests.oracle.greedy_extension`` in rational arithmetic.
    """
    logits, labels = make_inputs(case, seed=seed)
    probs = torch.softmax(logits.detach().double(), dim=1)
    groups = [slice(b, b + 1) for b in range(case.batch)] if per_volume else [slice(None)]
    volume_losses = []
    for group in groups:
        class_losses = []
        for c in range(case.classes):
            fg = (labels[group, 0] == c).flatten().tolist()
            if any(fg):
                p = probs[group, c].flatten().tolist()
                errors = [abs(float(f) - q) for f, q in zip(fg, p, strict=True)]
                class_losses.append(greedy_extension(errors, fg))
        volume_losses.append(sum(class_losses, Fraction(0)) / len(class_losses))
    return float(sum(volume_losses, Fraction(0)) / len(volume_losses))


def test_run_case_checks_values() -> None:
    case, settings = Case(2, 3, (4, 4, 4)), Settings(repeats=1, warmup=0, skip_memory=False)
    names = ["sort", "sort-volume", "histogram", "reference", "dice"]
    results = run_case(case, names, settings, torch.device("cpu"), log=lambda m: None)
    by_name = {r.name: r for r in results}
    # the values against the exact oracle (not against the reference loop, which is what the
    # benchmark's own diff column uses): batch 0.3605700, per volume 0.3621099 (they differ by
    # 1.5e-3, so a mix-up of the two fails); measured errors: reference and sort 1e-9,
    # sort-volume 3e-8, histogram (1024 bins) 2.4e-7
    exact_batch = _exact_lovasz_softmax(case, settings.seed, per_volume=False)
    exact_volume = _exact_lovasz_softmax(case, settings.seed, per_volume=True)
    assert abs(exact_batch - exact_volume) > 1e-3
    for name in ("reference", "sort", "histogram"):
        assert by_name[name].value == pytest.approx(exact_batch, abs=1e-5), name
    assert by_name["sort-volume"].value == pytest.approx(exact_volume, abs=1e-5)
    # the diff column is |value - reference loop| of the same quantity
    reference = by_name["reference"].value
    for name in ("sort", "histogram", "reference"):
        assert by_name[name].diff == pytest.approx(abs(by_name[name].value - reference), abs=1e-7)
    assert by_name["sort"].diff < 1e-5 and by_name["sort-volume"].diff < 1e-5
    assert by_name["dice"].diff is None
    assert by_name["dice"].value == pytest.approx(
        float(DiceLoss(to_onehot_y=True, softmax=True)(*make_inputs(case, seed=settings.seed)))
    )
    assert all(r.peak_bytes is not None and r.peak_bytes > 0 for r in results)
    table = format_table(results, markdown=True).splitlines()
    assert len(table) == 2 + len(names)
    assert {line.count("|") for line in table} == {11}
    assert "| reference loop (Alg. 1) | " in table[5] and "| 1.00 |" in table[5]


def test_cli_tiny_size_writes_markdown(tmp_path, capsys) -> None:
    out = tmp_path / "results.md"
    argv = ["--sizes", "1x3x8x8x8", "--repeats", "1", "--warmup", "0", "--markdown", str(out)]
    assert main(argv) == 0
    assert main(argv + ["--skip-memory", "--methods", "sort,dice"]) == 0  # appends a section
    text = out.read_text()
    assert text.count("## Benchmark") == 2
    assert "python -m lovasz_monai.benchmark --sizes 1x3x8x8x8" in text
    for needed in ("torch threads:", "torch 2.", "monai ", "device: cpu", "### B x C x spatial"):
        assert needed in text
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert {line.count("|") for line in tables} == {11}  # every row has every column
    assert tables[1] == "|" + "|".join(["---"] * 10) + "|"
    labels = [line.split("|")[1].strip() for line in tables]
    assert "ours sort (batch)" in labels and "MONAI DiceCELoss" in labels
    assert "reference loop (Alg. 1)" in capsys.readouterr().out


def test_cli_fails_loudly_when_the_sort_method_disagrees(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(benchmark, "SORT_TOLERANCE", -1.0)  # any difference is too large
    out = tmp_path / "results.md"
    argv = ["--sizes", "1x3x4x4", "--repeats", "1", "--warmup", "0", "--skip-memory"]
    assert main([*argv, "--methods", "sort,reference", "--markdown", str(out)]) == 1
    assert "VALUE CHECK FAILED" in capsys.readouterr().err
    assert "**VALUE CHECK FAILED**" in out.read_text()


def test_present_classes_inputs() -> None:
    """``present=K``: each volume holds exactly K classes, a different draw per volume, and the
    logits still favour the true class."""
    logits, labels = make_inputs(Case(3, 20, (10, 10, 10)), seed=2, present=4)
    kinds = [set(volume.unique().tolist()) for volume in labels]
    assert [len(k) for k in kinds] == [4, 4, 4] and len(set(map(frozenset, kinds))) > 1
    assert (logits.argmax(1, keepdim=True) == labels).float().mean() > 0.5
    with pytest.raises(ValueError, match=r"present must be in \[1, 20\], got 21"):
        make_inputs(Case(1, 20, (4,)), present=21)


def test_present_classes_rows_match_the_reference(capsys) -> None:
    argv = ["--sizes", "2x12x6x6x6", "--present", "3", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--skip-memory", "--methods", "sort,sort-volume,histogram"]) == 0
    assert "3 of the 12 classes in each volume" in capsys.readouterr().out


def test_kornia_is_optional(monkeypatch, capsys) -> None:
    monkeypatch.setattr(benchmark, "_kornia_available", lambda: False)
    parser = benchmark._parser()
    assert "kornia" not in benchmark._methods(parser.get_default("methods"), parser)
    with pytest.raises(SystemExit):
        benchmark._methods("sort,kornia", parser)  # asked for explicitly: an error
    assert "kornia is not installed" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys) -> None:
    bad = (["--sizes", "2x3"], ["--methods", "nope"], ["--repeats", "0"])
    bad += (["--sizes", "1x3x4x4", "--present", "4"], ["--sizes", "1x3x4x4", "--present", "0"])
    for argv in bad:
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert error.value.code == 2


# -- communication of the distributed loss (issue 11) ------------------------------------------


def test_communication_volume_by_hand():
    from lovasz_monai.tools.communication import communication_volume

    v = communication_volume(batch=2, classes=14, voxels=96**3, bins=1024, world_size=4)
    # max of 14 float32 + sum of (counts, error sums) x 14 rows x 2 x 1025 slots in float64
    assert v.allreduce_payload == 4 * 14 + 8 * 2 * 14 * 2 * 1025 == 459256
    assert v.allreduce_received == pytest.approx(2 * 3 / 4 * 459256)
    # 3 other processes x 2 volumes x 96^3 voxels x (14 float32 errors + 1 uint8 label)
    assert v.allgather_received == 3 * 2 * 884736 * 57
    assert v.ratio == pytest.approx(3 * 2 * 884736 * 57 / (1.5 * 459256))
    with pytest.raises(ValueError, match="world_size >= 2"):
        communication_volume(1, 2, 8, 4, world_size=1)


@pytest.mark.slow
def test_communication_benchmark_command(capsys):
    status = main(
        ["--communication", "--sizes", "1x3x8x8x8", "--repeats", "1", "--warmup", "0"]
        + ["--skip-memory", "--bins", "16"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "### Communication of the distributed loss per step (16 bins)" in out
    # computed: the 5 sizes of the GPU grid x 3 world sizes
    computed = [line for line in out.splitlines() if " voxels | " in line]
    assert len(computed) == 15
    (measured,) = [line for line in out.splitlines() if line.startswith("| 1x3x8x8x8 |")]
    cells = [c.strip() for c in measured.strip("|").split("|")]
    times = [float(c) for c in cells[1:5]]
    assert all(t > 0 for t in times)
    # the ratio of the unrounded times lies within the rounding of the two printed ones (0.1 ms)
    ratio, (local, spread) = float(cells[5].rstrip("x")), times[2:4]
    low, high = (spread - 0.05) / (local + 0.05), (spread + 0.05) / max(local - 0.05, 1e-9)
    assert low - 0.005 <= ratio <= high + 0.005
    # no loss grid in this mode
    assert "ours sort (batch)" not in out


def test_many_classes_preset(monkeypatch, capsys) -> None:
    """``--sizes many-classes`` runs the parcellation and TotalSegmentator sizes with 20 classes
    present per volume unless ``--present`` says otherwise (sizes shrunk here to be quick)."""
    monkeypatch.setattr(benchmark, "MANY_CLASS_GRID", "1x24x4x4x4,1x30x3x3x3")
    argv = ["--sizes", "many-classes", "--repeats", "1", "--warmup", "0", "--skip-memory"]
    assert main([*argv, "--methods", "sort,reference"]) == 0
    out = capsys.readouterr().out
    assert "1x24x4x4x4 (64 voxels per class), 20 of the 24 classes in each volume" in out
    assert "1x30x3x3x3 (27 voxels per class), 20 of the 30 classes in each volume" in out
    assert main([*argv, "--methods", "sort", "--present", "5"]) == 0
    assert "5 of the 30 classes" in capsys.readouterr().out
