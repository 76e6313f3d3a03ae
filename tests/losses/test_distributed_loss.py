"""The global-batch Lovász loss across 2 CPU processes (gloo) against the single-process loss of
the concatenated batch: values, input gradients (times the world size), DDP parameter gradients,
the histogram bound against the exact sort, and the no-op without a process group."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai import functional as Fn

WORLD = 2
BINS = 64
IGNORE = 255
C = 4  # background + 3 classes

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"
)


def _labels(g: torch.Generator, shape: tuple[int, ...], classes: list[int]) -> torch.Tensor:
    """A label map with values from ``classes`` and about 15% ignored voxels."""
    pick = torch.randint(0, len(classes), shape, generator=g)
    labels = torch.tensor(classes)[pick]
    return labels.masked_fill(torch.rand(shape, generator=g) < 0.15, IGNORE)


def scenario(name: str) -> list[dict[str, torch.Tensor]]:
    """The parts of one batch held by each process, built identically in every process.

    Each part has ``logits`` (B_r, C, *S_r), ``labels`` (B_r, 1, *S_r) with ignored voxels and
    ``mask`` (B_r, 1, *S_r). Spatial sizes and batch sizes differ between the processes.
    """
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shapes = [(2, 1, 6, 5, 4), (1, 1, 3, 7, 5)]
    # class 3 only on process 0; process 1 holds classes 0-2
    classes = [[0, 1, 2, 3], [0, 1, 2]]
    parts = []
    for rank, shape in enumerate(shapes):
        labels = _labels(g, shape, classes[rank])
        mask = torch.rand(shape, generator=g) > 0.1
        if name == "rank1_ignored" and rank == 1:
            mask = torch.zeros(shape, dtype=torch.bool)
        logits = 2 * torch.randn(shape[0], C, *shape[2:], generator=g)
        parts.append({"logits": logits, "labels": labels, "mask": mask})
    return parts


def concatenated(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ``(1, C, P)`` "volume" of all the voxels of all parts: with ``batch=True`` the loss
    does not depend on how voxels are grouped into volumes or ordered."""
    return {
        key: torch.cat([p[key].transpose(0, 1).flatten(1) for p in parts], dim=1)[None]
        for key in ("logits", "labels", "mask")
    }


def losses(distributed: bool = False) -> dict[str, torch.nn.Module]:
    """The losses under test, by name."""
    common = {"batch": True, "method": "histogram", "bins": BINS, "distributed": distributed}
    return {
        "softmax": LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE, **common),
        "softmax_all_weighted": LovaszSoftmaxLoss(
            to_onehot_y=True,
            ignore_index=IGNORE,
            classes="all",
            weight=[0.5, 1.0, 2.0, 3.0],
            **common,
        ),
        "softmax_present_weighted": LovaszSoftmaxLoss(
            to_onehot_y=True, ignore_index=IGNORE, weight=[0.5, 1.0, 2.0, 3.0], **common
        ),
        "sigmoid": LovaszSoftmaxLoss(to_onehot_y=True, sigmoid=True, ignore_index=IGNORE, **common),
        "hinge": LovaszHingeLoss(to_onehot_y=True, ignore_index=IGNORE, **common),
        "lovasz_ce": LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_ce=0.3, **common),
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results: dict = {}
        for name in ("mixed", "rank1_ignored"):
            part = scenario(name)[rank]
            for loss_name, loss in losses(distributed=True).items():
                logits = part["logits"].clone().requires_grad_(True)
                value = loss(logits, part["labels"], part["mask"])
                value.backward()
                results[name, loss_name] = (value.detach(), logits.grad)
            # per-class rows of the functional API, for the bound against the exact sort
            probs = torch.softmax(part["logits"], 1)
            onehot = F.one_hot(part["labels"][:, 0].clamp_max(C - 1), C).movedim(-1, 1)
            valid = part["mask"] & (part["labels"] != IGNORE)
            rows, counts = Fn.lovasz_probability_class_losses(
                probs, onehot, valid, batch=True, method="histogram", bins=8, distributed=True
            )
            results[name, "rows"] = (rows, counts)
        # under autocast: bf16 logits, the value as from the float32 copy of those logits
        part = scenario("mixed")[rank]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = part["logits"].to(torch.bfloat16).requires_grad_(True)
            value = losses(distributed=True)["softmax"](logits, part["labels"], part["mask"])
        value.backward()
        results["autocast"] = (value.detach(), logits.grad.float())
        # DDP: the parameters receive the gradient of the global loss
        results["ddp"] = _ddp_gradient(part)
        torch.save(results, f"{out}{rank}")
    finally:
        dist.destroy_process_group()


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(C, C, 3, padding=1)


def _ddp_gradient(part: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Parameter gradients of one DDP step of ``LovaszCELoss(distributed=True)``."""
    model = torch.nn.parallel.DistributedDataParallel(_network())
    loss = LovaszCELoss(
        to_onehot_y=True,
        ignore_index=IGNORE,
        batch=True,
        method="histogram",
        bins=BINS,
        lambda_ce=0.0,
        distributed=True,
    )
    loss(model(part["logits"]), part["labels"], part["mask"]).backward()
    return [p.grad.clone() for p in model.parameters()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("ddp_loss") / "rank")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}{r}", weights_only=False) for r in range(WORLD)]


def _split_grad(grad: torch.Tensor, parts: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The gradient of the concatenated ``(1, C, P)`` logits, back in each part's shape."""
    sizes = [p["logits"][:, 0].numel() for p in parts]
    pieces = grad[0].split(sizes, dim=1)
    return [
        piece.reshape(C, p["logits"].shape[0], *p["logits"].shape[2:]).transpose(0, 1)
        for piece, p in zip(pieces, parts, strict=True)
    ]


def _local_ce(part: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    labels = part["labels"][:, 0].masked_fill(~part["mask"][:, 0], IGNORE)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed", "rank1_ignored"])
@pytest.mark.parametrize("loss_name", list(losses()))
def test_global_loss_equals_single_process_loss(rank_results, name, loss_name):
    parts = scenario(name)
    whole = concatenated(parts)
    loss = losses()[loss_name]
    single_loss = loss
    if isinstance(loss, LovaszCELoss):  # the Lovász term is global, the CE term local
        single_loss = LovaszSoftmaxLoss(
            to_onehot_y=True, ignore_index=IGNORE, batch=True, method="histogram", bins=BINS
        )
    logits = whole["logits"].clone().requires_grad_(True)
    single = single_loss(logits, whole["labels"], whole["mask"])
    single.backward()
    expected_grads = _split_grad(logits.grad, parts)
    assert single.item() > 0.05  # a real loss, not a degenerate 0
    for rank, part in enumerate(parts):
        value, grad = rank_results[rank][name, loss_name]
        expected = single
        expected_grad = expected_grads[rank] * WORLD  # the documented scale
        if isinstance(loss, LovaszCELoss):
            local = part["logits"].clone().requires_grad_(True)
            ce = _local_ce(part, local)
            ce.backward() if part["mask"].any() else None
            expected = single + loss.lambda_ce * (ce if part["mask"].any() else 0.0)
            if part["mask"].any():
                expected_grad = expected_grad + loss.lambda_ce * local.grad
        torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    logits = parts[0]["logits"].clone().requires_grad_(True)
    local = loss(logits, parts[0]["labels"], parts[0]["mask"])
    local.backward()
    value, grad = rank_results[0][name, loss_name]
    if name == "rank1_ignored":
        assert not rank_results[1][name, loss_name][1].any()  # nothing to learn from rank 1
        # the union is process 0's batch: its local loss is the global one
        torch.testing.assert_close(local, value)
    else:  # process 0's local loss differs: the option does change what is computed
        assert (logits.grad - grad / WORLD).abs().max() > 0.1 * logits.grad.abs().max()


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed", "rank1_ignored"])
def test_histogram_bound_against_exact_sort_of_the_union(rank_results, name):
    whole = concatenated(scenario(name))
    probs = torch.softmax(whole["logits"], 1)
    onehot = F.one_hot(whole["labels"][:, 0].clamp_max(C - 1), C).movedim(-1, 1)
    valid = whole["mask"] & (whole["labels"] != IGNORE)
    exact, counts = Fn.lovasz_probability_class_losses(probs, onehot, valid, batch=True)
    errors = torch.where(onehot.bool(), 1 - probs, probs).masked_fill(~valid, 0)
    e_max = errors.transpose(0, 1).flatten(1).amax(1)
    for rank in range(WORLD):
        rows, rank_counts = rank_results[rank][name, "rows"]
        assert torch.equal(rank_counts, counts)  # global counts on every process
        gap = exact[0] - rows[0]
        assert (gap >= -1e-6).all() and (gap < e_max / 8).all(), (gap, e_max / 8)
    assert (exact - rank_results[0][name, "rows"][0]).abs().max() > 1e-4  # the bound is not void
    assert counts[0, 3] > 0  # class 3 (on process 0 only) is present in the union


@needs_gloo
@pytest.mark.slow
def test_autocast_inputs(rank_results):
    parts = scenario("mixed")
    whole = concatenated(parts)
    logits = whole["logits"].to(torch.bfloat16).float().requires_grad_(True)
    single = losses()["softmax"](logits, whole["labels"], whole["mask"])
    single.backward()
    expected = _split_grad(logits.grad, parts)
    for rank in range(WORLD):
        value, grad = rank_results[rank]["autocast"]
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, single.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected[rank] * WORLD, rtol=1e-2, atol=1e-4)


@needs_gloo
@pytest.mark.slow
def test_ddp_parameters_receive_the_gradient_of_the_global_loss(rank_results):
    """DDP averages the two processes' gradients; with the world-size scale that average is the
    gradient of the loss of the whole batch, as one process holding the whole batch gets it."""
    parts = scenario("mixed")
    model = _network()
    loss = LovaszSoftmaxLoss(
        to_onehot_y=True, ignore_index=IGNORE, batch=True, method="histogram", bins=BINS
    )
    outputs = [model(p["logits"]) for p in parts]
    whole = {
        "logits": torch.cat([o.transpose(0, 1).flatten(1) for o in outputs], dim=1)[None],
        **{k: v for k, v in concatenated(parts).items() if k != "logits"},
    }
    loss(whole["logits"], whole["labels"], whole["mask"]).backward()
    expected = [p.grad for p in model.parameters()]
    for rank in range(WORLD):
        for got, want in zip(rank_results[rank]["ddp"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 1e-4 for g in expected)


@pytest.mark.parametrize("loss_name", list(losses()))
def test_without_a_process_group_nothing_changes(loss_name):
    part = scenario("mixed")[0]
    loss = losses()[loss_name]
    a = part["logits"].clone().requires_grad_(True)
    b = part["logits"].clone().requires_grad_(True)
    plain = loss(a, part["labels"], part["mask"])
    spread = losses(distributed=True)[loss_name](b, part["labels"], part["mask"])
    plain.backward()
    spread.backward()
    assert not dist.is_initialized()
    assert torch.equal(plain, spread) and torch.equal(a.grad, b.grad)
    assert Fn.distributed_world_size(True) == 1


@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss, LovaszCELoss])
def test_distributed_needs_batch_and_histogram(cls):
    with pytest.raises(ValueError, match="needs batch=True"):
        cls(distributed=True, method="histogram")
    with pytest.raises(ValueError, match="needs method='histogram'.*max\\(error\\) / bins"):
        cls(distributed=True, batch=True)
    with pytest.raises(ValueError, match="needs method='histogram'"):
        Fn.lovasz_softmax(torch.rand(1, 2, 4), torch.ones(1, 2, 4), batch=True, distributed=True)


# -- bad input on one process: the same ValueError on every process, never a hang --------------

DISAGREEMENTS = {
    # name: (what rank 1 changes, the message every process must raise)
    "channels": "must hold the same number of channels, bins and compute dtype",
    "dtype": "must hold the same number of channels, bins and compute dtype",
    "bins": "must hold the same number of channels, bins and compute dtype",
    "bad_label": r"bad input on process 1 .*label map values must lie in \[0, 4\)",
    "nan_logits": r"bad input on process 0 .*input contains NaN or inf",
    "empty_batch": r"bad input on process 1 .*at least one volume",
    "not_a_tensor": r"bad input on process 0 .*target must be a torch.Tensor, got ndarray",
    "functional_bad_label": r"bad input on process 1 .*label map values must lie",
    "input_not_a_tensor": r"bad input on process 1 .*input must be a torch.Tensor, got list",
    "uint16_bad_label": r"bad input on process 1 .*label map values must lie in \[0, 4\)",
    "target_on_another_device": r"bad input on process 1 .*target is on meta",
    "classes_out_of_range": r"bad input on process 1 .*classes \[4\] out of range",
    "functional_one_hot_shape": r"bad input on process 1 .*target must be a \(B, 1, \*spatial\)",
    "class_losses_shape": r"bad input on process 0 .*input and labels must both be",
}


def _disagreeing_call(name: str, rank: int) -> torch.Tensor:
    """One distributed loss call in which process ``rank`` holds what scenario ``name`` gives."""
    g = torch.Generator().manual_seed(rank)
    channels = 3 if name == "channels" and rank == 1 else C
    batch = 0 if name == "empty_batch" and rank == 1 else 2
    logits = torch.randn(batch, channels, 4, 5, 3, generator=g)
    labels = torch.randint(0, channels, (batch, 1, 4, 5, 3), generator=g)
    if name == "dtype" and rank == 1:
        logits = logits.double()
    if name in ("bad_label", "functional_bad_label", "uint16_bad_label") and rank == 1:
        labels[0, 0, 0, 0, 0] = 7
    if name == "nan_logits" and rank == 0:
        logits[0, 0, 0, 0, 0] = float("nan")
    target = labels.numpy() if name == "not_a_tensor" and rank == 0 else labels
    if name == "uint16_bad_label":
        target = labels.to(torch.uint16 if rank == 1 else torch.uint8)
    if name == "target_on_another_device" and rank == 1:
        target = labels.to("meta")
    bins = 32 if name == "bins" and rank == 1 else BINS
    common = {"batch": True, "method": "histogram", "bins": bins, "distributed": True}
    probs = torch.softmax(logits, 1)
    if name == "functional_bad_label":
        return Fn.lovasz_softmax(probs, labels, **common)
    if name == "functional_one_hot_shape":  # one-hot labels, one voxel row short on rank 1
        one_hot = F.one_hot(labels[:, 0], C).movedim(-1, 1)
        return Fn.lovasz_softmax(probs, one_hot[..., : 3 - rank], **common)
    if name == "class_losses_shape":
        one_hot = F.one_hot(labels[:, 0], C).movedim(-1, 1)
        errors = (probs - one_hot).abs()
        return Fn.lovasz_class_losses(errors, one_hot[:, : C - 1 + rank], **common)[0].sum()
    if name == "input_not_a_tensor" and rank == 1:
        logits = logits.tolist()
    if name == "classes_out_of_range":
        return LovaszSoftmaxLoss(to_onehot_y=True, classes=[1 + 3 * rank], **common)(logits, target)
    cls = {"dtype": LovaszHingeLoss, "bad_label": LovaszSoftmaxLoss, "good": LovaszSoftmaxLoss}
    return cls.get(name, LovaszCELoss)(to_onehot_y=True, **common)(logits, target)


def _disagreement_worker(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a hang would end here after 60 s (the test's own limit is shorter still)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results: dict = {}
        for name in DISAGREEMENTS:
            try:
                _disagreeing_call(name, rank)
                results[name] = ("no error", "")
            except Exception as error:  # noqa: BLE001 - recorded for the test to check
                results[name] = (type(error).__name__, str(error))
        # after all these errors the processes are still in step: a good call of the global
        # loss gives the same value on both
        results["after"] = _disagreeing_call("good", rank).item()
        torch.save(results, f"{out}{rank}")
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.slow
def test_processes_that_disagree_or_hold_bad_input_all_raise_instead_of_hanging(tmp_path):
    out = str(tmp_path / "rank")
    context = mp.start_processes(
        _disagreement_worker,
        args=(_free_port(), out),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = 90.0  # seconds: a hang fails the test instead of stalling the suite

    start = time.monotonic()
    while not context.join(timeout=1.0):
        if time.monotonic() - start > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed loss hung (no result after {deadline:.0f} s)")
    results = [torch.load(f"{out}{r}", weights_only=False) for r in range(WORLD)]
    for name, pattern in DISAGREEMENTS.items():
        for rank in range(WORLD):
            kind, message = results[rank][name]
            assert kind == "ValueError", (name, rank, kind, message)
            assert re.search(pattern, message), (name, rank, message)
        assert results[0][name] == results[1][name]  # the same error on every process
    assert results[0]["after"] == results[1]["after"] > 0
