"""Per-case Dice / IoU / HD95 / ASD (lovasz_monai.metrics) and their use in the module and CLI.

Lightning, the CLI and nibabel are imported inside the tests that use them: the DDP test's
worker processes import this file, and should start fast.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import MetaTensor
from monai.metrics import (
    DiceMetric,
    HausdorffDistanceMetric,
    MeanIoU,
    SurfaceDistanceMetric,
    compute_dice,
)

from lovasz_monai.metrics import CaseMetrics, CaseResults, batch_cases, case_id, case_metrics

NAN, INF = math.nan, math.inf
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def volume(shape, boxes) -> torch.Tensor:
    """``(1, 1, *shape)`` label map: ``boxes`` = [(value, slices), ...] painted in order."""
    x = torch.zeros(1, 1, *shape, dtype=torch.long)
    for value, box in boxes:
        x[(0, 0, *box)] = value
    return x


def one_hot_masked(x: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` label map -> ``(B, C, *S)`` float one-hot, 0 where ``valid`` is False."""
    oh = torch.nn.functional.one_hot(x[:, 0].long(), num_classes).movedim(-1, 1).float()
    return oh * valid.float()


def assert_same(got, expected, rel=1e-5):
    """Elementwise equality with NaN == NaN and inf == inf."""
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    np.testing.assert_allclose(got, expected, rtol=rel, atol=1e-6, equal_nan=True)


# -- Dice and IoU ---------------------------------------------------------------------------


def test_dice_iou_hand_computed():
    # 4 x 4 x 1 voxels; class 1: label 4 voxels, pred 3 of them + 1 wrong; class 2: label 2
    # voxels, pred 1 of them; the rest background
    label = volume((4, 4, 1), [(1, (slice(0, 1), slice(0, 4))), (2, (slice(3, 4), slice(0, 2)))])
    pred = volume(
        (4, 4, 1),
        [(1, (slice(0, 1), slice(0, 3))), (1, (slice(1, 2), slice(0, 1))), (2, (3, 0))],
    )
    out = case_metrics(pred, label, num_classes=3)
    # class 1: |P|=4, |L|=4, |P&L|=3 -> Dice 6/8, IoU 3/5; class 2: |P|=1, |L|=2, inter 1
    # background: L = 16-6 = 10, P = 16-5 = 11, P&L = 10 - 1 (pred 1 at (1,0)) = 9
    assert_same(out["Dice"], [[18 / 21, 6 / 8, 2 / 3]])
    assert_same(out["IoU"], [[9 / 12, 3 / 5, 1 / 2]])
    assert_same(out["LabelVoxels"], [[10, 4, 2]])
    assert set(out) == {"Dice", "IoU", "LabelVoxels"}  # no surface metrics unless asked


def test_masked_voxels_are_left_out():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    pred = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    mask = (torch.rand(2, 1, 6, 5, 4, generator=g) > 0.3).float()
    out = case_metrics(pred, label, mask, num_classes=3)
    # zeroing both one-hot tensors at masked voxels == dropping those voxels
    for b in range(2):
        valid = mask[b, 0].bool()
        p, y = pred[b, 0][valid].view(1, 1, -1), label[b, 0][valid].view(1, 1, -1)
        for c in range(3):
            dropped = compute_dice((p == c).float(), (y == c).float(), ignore_empty=False)
            assert float(out["Dice"][b, c]) == pytest.approx(float(dropped))
            assert float(out["LabelVoxels"][b, c]) == int((y == c).sum())
    # anything under the mask changes nothing
    other_pred, other_label = pred.clone(), label.clone()
    hidden = mask == 0
    other_pred[hidden], other_label[hidden] = 2, 1
    again = case_metrics(other_pred, other_label, mask, num_classes=3)
    for key in out:
        torch.testing.assert_close(again[key], out[key], equal_nan=True)
    # a prediction wrong only under the mask is perfect
    assert_same(case_metrics(other_pred, pred, mask, num_classes=3)["Dice"], torch.ones(2, 3))


def test_absent_class_is_nan_and_left_out_of_means():
    shape = (4, 4, 4)
    both = volume(shape, [(1, (slice(0, 2),)), (2, (slice(2, 3), slice(0, 2)))])
    case1_label = volume(shape, [(1, (slice(0, 2),))])  # class 2 absent from label...
    case1_pred = volume(shape, [(1, (slice(0, 1),))])  # ...and from prediction
    fp_pred = volume(shape, [(1, (slice(0, 2),)), (2, (0, 0, 0))])  # class 2 only predicted
    m = CaseMetrics(3, ["bg", "a", "b"], surface=True)
    m.update(both, both, sources=["d/x1.nii.gz"])
    m.update(case1_pred, case1_label, sources=["d/x2.nii.gz"])
    m.update(fp_pred, case1_label, sources=["d/x3.nii.gz"])
    r = m.gather()
    assert r.cases == ["x1", "x2", "x3"] and r.sources[0] == "d/x1.nii.gz"
    dice, hd = r.values["Dice"], r.values["HD95"]
    assert float(dice[0, 2]) == 1.0 and math.isnan(dice[1, 2])  # absent from both: NaN
    assert float(dice[1, 1]) == pytest.approx(2 * 16 / (16 + 32))
    # only predicted: Dice = IoU = 0 (not NaN as DiceMetric(ignore_empty=True) would give)
    assert float(dice[2, 2]) == 0.0 and float(r.values["IoU"][2, 2]) == 0.0
    assert hd[2, 2] == INF and r.values["ASD"][2, 2] == INF and math.isnan(hd[1, 2])
    assert torch.isnan(hd[:, 0]).all()  # background: no surface metrics (not counted)
    s = r.summary()
    assert float(s["Dice/b"]) == pytest.approx((1.0 + 0.0) / 2)  # NaN case left out
    assert float(s["mDice"]) == pytest.approx((float(s["Dice/a"]) + 0.5) / 2)  # bg left out
    assert float(s["HD95/b"]) == INF and "HD95/bg" not in s and "Dice/bg" in s
    assert set(s) == {"Dice/bg", "Dice/a", "Dice/b", "mDice"} | {
        f"{m}/{c}" for m in ("HD95", "ASD") for c in ("a", "b")
    } | {"mHD95", "mASD", "mHD95_found", "mASD_found", "num_one_sided", "num_missed"} | {
        "num_spurious"
    }
    # x3 predicts b where the label has none: one-sided, left out of the found-only mean
    assert float(s["mHD95"]) == INF and float(s["num_one_sided"]) == 1.0
    assert float(s["num_missed"]) == 0.0 and float(s["num_spurious"]) == 1.0
    assert_same(r.values["LabelVoxels"], [[24, 32, 8], [32, 32, 0], [32, 32, 0]])
    found = [(hd[0, 1] + hd[0, 2]) / 2, hd[1, 1], hd[2, 1]]
    assert float(s["mHD95_found"]) == pytest.approx(float(sum(found)) / 3)
    # include_background counts class 0; a class NaN in every case stays NaN
    m = CaseMetrics(3, include_background=True)
    m.update(case1_pred, case1_label)
    s = m.gather().summary()
    assert math.isnan(s["Dice/class_2"]) and float(s["mDice"]) == pytest.approx(
        (float(s["Dice/class_0"]) + float(s["Dice/class_1"])) / 2
    )


def test_one_sided_structures_split_into_missed_and_spurious(tmp_path):
    """Case 1 misses b and predicts c where its label has none; case 2 misses a and b; the
    background is not counted. A table without label voxels (written before they were
    stored) gives the total only."""
    shape = (4, 4, 4)
    label1 = volume(shape, [(1, (slice(0, 2),)), (2, (3, 3, 3))])
    pred1 = volume(shape, [(1, (slice(0, 2),)), (3, (0, 0, 0))])
    label2 = volume(shape, [(1, (0, 0, 0)), (2, (1, 1, 1)), (3, (slice(3, 4),))])
    pred2 = volume(shape, [(3, (slice(3, 4),))])
    m = CaseMetrics(4, ["bg", "a", "b", "c"], surface=True)
    m.update(torch.cat([pred1, pred2]), torch.cat([label1, label2]))
    r = m.gather()
    assert (r.num_one_sided(), r.num_missed()) == (4, 3)
    s = r.summary()
    assert [float(s[k]) for k in ("num_one_sided", "num_missed", "num_spurious")] == [4, 3, 1]
    back = CaseResults.read_csv(r.write_csv(tmp_path / "cases.csv"), counted=[1, 2, 3])
    assert_same(back.values["LabelVoxels"], r.values["LabelVoxels"])
    assert (back.num_one_sided(), back.num_missed()) == (4, 3)
    del r.values["LabelVoxels"]
    assert r.num_missed() is None and "num_missed" not in r.summary()
    # regions: each channel's own voxels, ignored voxels left out
    regions = torch.tensor([[[1, 1, 0, 1]], [[0, 1, 1, 1]]]).unsqueeze(0)  # (1, 2, 1, 4)
    mask = torch.tensor([[[[1, 1, 1, 0]]]])
    out = case_metrics(regions, regions, mask, num_classes=2, multi_label=True)
    assert_same(out["LabelVoxels"], [[2, 2]])


def test_multi_label_regions_all_counted():
    g = torch.Generator().manual_seed(1)
    label = (torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5).long()
    pred = (torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5).long()
    mask = torch.ones(2, 1, 5, 5, 5)
    mask[..., 0] = 0
    m = CaseMetrics(3, ["TC", "WT", "ET"], multi_label=True)
    out = m.update(pred, label, mask)
    expected = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        pred * mask, label * mask
    )
    assert_same(out["Dice"], expected)
    r = m.gather()
    assert m.counted == [0, 1, 2] and r.cases == ["case_000", "case_001"]
    assert float(r.summary()["mDice"]) == pytest.approx(float(expected.mean()))


def test_agrees_with_monai_metric_classes():
    """The values equal MONAI's DiceMetric / MeanIoU / HausdorffDistanceMetric(95) /
    SurfaceDistanceMetric(symmetric) on one-hot tensors zeroed at masked voxels."""
    g = torch.Generator().manual_seed(2)
    label = torch.zeros(2, 1, 12, 12, 8, dtype=torch.long)
    label[:, :, 2:8, 3:9, 1:6] = 1
    label[:, :, 6:10, 6:11, 3:7] = 2
    pred = torch.where(torch.rand(label.shape, generator=g) < 0.1, (label + 1) % 3, label)
    mask = torch.ones(2, 1, 12, 12, 8)
    mask[1, :, :, :, 5:] = 0
    spacing = [(0.8, 0.8, 2.5), (1.0, 1.2, 3.0)]
    out = case_metrics(pred, label, mask, num_classes=3, spacing=spacing, surface_classes=[0, 1, 2])
    p, y = one_hot_masked(pred, mask.bool(), 3), one_hot_masked(label, mask.bool(), 3)
    every = {"include_background": True, "reduction": "none"}
    assert_same(out["Dice"], DiceMetric(**every, ignore_empty=False)(p, y))
    assert_same(out["IoU"], MeanIoU(**every, ignore_empty=False)(p, y))
    hd = HausdorffDistanceMetric(**every, percentile=95)(p, y, spacing=spacing)
    asd = SurfaceDistanceMetric(**every, symmetric=True)(p, y, spacing=spacing)
    assert torch.isfinite(hd).all() and (hd > 0).all()
    assert_same(out["HD95"], hd)
    assert_same(out["ASD"], asd)


# -- surface distances in mm ------------------------------------------------------------------


def test_hd95_and_asd_in_mm_with_anisotropic_spacing():
    # a 2x2x2 cube, predicted one slice off along the last axis: half of each cube's boundary
    # voxels are in the other cube (distance 0), the other half one slice away
    label = volume((6, 6, 6), [(1, (slice(2, 4), slice(2, 4), slice(2, 4)))])
    pred = volume((6, 6, 6), [(1, (slice(2, 4), slice(2, 4), slice(3, 5)))])

    def surface(spacing):
        out = case_metrics(pred, label, num_classes=2, spacing=spacing, surface_classes=[1])
        return float(out["HD95"][0, 1]), float(out["ASD"][0, 1])

    # distances (both directions): four 0s and four d, d = 3 mm (the slice thickness)
    assert surface((1.0, 1.0, 3.0)) == pytest.approx((3.0, 1.5))  # 95th pct of 0,0,0,0,3,3,3,3
    assert surface((0.5, 0.5, 1.0)) == pytest.approx((1.0, 0.5))
    assert surface((3.0, 3.0, 0.7)) == pytest.approx((0.7, 0.35))  # only the last axis counts
    assert surface(None) == pytest.approx((1.0, 0.5))  # no spacing: voxels


def test_surface_metrics_on_the_masked_segmentations():
    """Ignored voxels are removed from prediction and label before the surfaces are found."""
    label = volume((8, 8, 10), [(1, (slice(2, 5), slice(2, 5), slice(1, 4)))])
    pred = label.clone()
    pred[0, 0, 2:5, 2:5, 7:9] = 1  # a false positive blob ...
    mask = torch.ones(1, 1, 8, 8, 10)
    mask[..., 6:] = 0  # ... that lies in the ignored region
    spacing = (1.0, 1.0, 2.0)
    masked = case_metrics(pred, label, mask, num_classes=2, spacing=spacing, surface_classes=[1])
    assert float(masked["HD95"][0, 1]) == 0.0 and float(masked["ASD"][0, 1]) == 0.0
    unmasked = case_metrics(pred, label, num_classes=2, spacing=spacing, surface_classes=[1])
    assert float(unmasked["HD95"][0, 1]) > 4.0
    # a structure cut by the mask: both segmentations end at the border of the valid region
    label = volume((8, 8, 10), [(1, (slice(2, 5), slice(2, 5), slice(2, 9)))])
    pred = volume((8, 8, 10), [(1, (slice(2, 5), slice(2, 5), slice(3, 9)))])
    mask = torch.ones(1, 1, 8, 8, 10)
    mask[..., 6:] = 0
    out = case_metrics(pred, label, mask, num_classes=2, spacing=spacing, surface_classes=[1])
    p, y = one_hot_masked(pred, mask.bool(), 2), one_hot_masked(label, mask.bool(), 2)
    hd = HausdorffDistanceMetric(percentile=95, reduction="none")(p, y, spacing=[spacing])
    assert float(out["HD95"][0, 1]) == pytest.approx(float(hd[0, 0]))
    assert float(out["HD95"][0, 1]) == pytest.approx(2.0)  # one 2 mm slice apart


# -- metadata, CSV, errors --------------------------------------------------------------------


def test_case_id_and_batch_metadata():
    assert case_id("/a/b/liver_7.nii.gz") == "liver_7" and case_id("x.nii") == "x"
    assert case_id("patient_01") == "patient_01" and case_id(Path("c.mha")) == "c"
    affine = torch.tensor(
        [[0.0, -2.0, 0.0, 5.0], [0.7, 0.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0], [0, 0, 0, 1.0]]
    )
    items = [
        MetaTensor(torch.zeros(1, 3, 3, 3), affine=affine, meta={"filename_or_obj": f"{n}.nii"})
        for n in ("u", "v")
    ]
    from monai.data import list_data_collate

    batch = list_data_collate([{"image": i} for i in items])["image"]
    sources, spacings = batch_cases(batch)
    assert sources == ["u.nii", "v.nii"]
    assert_same(spacings, [(0.7, 2.0, 3.0)] * 2)
    assert batch_cases(torch.zeros(2, 1, 3, 3, 3)) == (None, None)


def test_a_case_without_a_source_never_takes_a_real_case_name():
    """Placeholders are ``case_<row>``; a file already named ``case_001`` keeps its name and
    the unnamed case in row 1 becomes ``case_001_1``."""
    x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    m = CaseMetrics(2)
    for source in ("img/case_001.nii.gz", None, "img/case_000.nii.gz", None):
        m.update(x, x, sources=[source] if source else None)
    assert m.gather().cases == ["case_001", "case_001_1", "case_000", "case_003"]


def test_cases_in_folders_are_named_after_their_folders():
    """KiTS layout: every image is ``imaging.nii.gz``; the case folders tell them apart, a case
    without a source keeps its placeholder, and a file seen twice counts once."""
    x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    m = CaseMetrics(2)
    for source in ("k/case_00007/imaging.nii.gz", None, "k/case_00002/imaging.nii.gz"):
        m.update(x, x, sources=[source] if source else None)
    m.update(x, x, sources=["k/case_00007/imaging.nii.gz"])
    r = m.gather()
    assert r.cases == ["case_00007", "case_001", "case_00002"]
    assert r.sources == ["k/case_00007/imaging.nii.gz", "", "k/case_00002/imaging.nii.gz"]
    # only names that even their folders cannot tell apart repeat; the image column differs
    m = CaseMetrics(2)
    y = torch.zeros(3, 1, 2, 2, dtype=torch.long)
    m.update(y, y, sources=["k/c0/imaging.nii.gz", "k/c1/imaging.nii.gz", "k/c1/imaging.nii"])
    assert m.gather().cases == ["c0_imaging", "c1_imaging", "c1_imaging"]


def test_csv_table(tmp_path):
    r = CaseResults(
        cases=["a", "b"],
        sources=["x/a.nii.gz", ""],
        values={
            "Dice": torch.tensor([[1.0, 0.25, NAN], [0.5, 0.75, 0.1]]),
            "IoU": torch.tensor([[1.0, 1 / 7, NAN], [1 / 3, 0.6, 0.05]]),
            "HD95": torch.tensor([[NAN, 1.5, NAN], [NAN, INF, 2.0]]),
        },
        class_names=["bg", "c/1", "c2"],
        counted=[1, 2],
    )
    path = r.write_csv(tmp_path / "sub" / "cases.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "image"] + [
        f"{m}/{c}" for m in ("Dice", "IoU") for c in ("bg", "c/1", "c2")
    ] + ["HD95/c/1", "HD95/c2"]
    assert [r_["case"] for r_ in rows] == ["a", "b"] and rows[1]["image"] == ""
    assert float(rows[0]["IoU/c/1"]) == float(torch.tensor(1 / 7))  # full float32 precision
    assert math.isnan(float(rows[0]["Dice/c2"])) and float(rows[1]["HD95/c/1"]) == INF
    s = r.summary()
    assert "Dice/c_1" in s and "IoU/c_1" not in s  # IoU is logged dataset-level by the module
    assert float(s["mHD95"]) == INF and float(s["HD95/c2"]) == 2.0
    assert float(s["mHD95_found"]) == pytest.approx((1.5 + 2.0) / 2) and s["num_one_sided"] == 1

    back = CaseResults.read_csv(path, counted=[1, 2])  # the table read back, bit for bit
    assert (back.cases, back.sources, back.class_names) == (r.cases, r.sources, r.class_names)
    assert set(back.values) == {"Dice", "IoU", "HD95"}
    for metric, values in r.values.items():
        torch.testing.assert_close(back.values[metric], values, rtol=0, atol=0, equal_nan=True)
    # case b: HD95 inf for c/1, so 2.0 over the found; case a: 1.5; one value one-sided
    torch.testing.assert_close(back.case_means("HD95", finite_only=True), torch.tensor([1.5, 2.0]))
    assert back.case_means("HD95")[1] == INF and back.num_one_sided() == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("case,image,IoU/a\nx,,0.5\n")
    with pytest.raises(ValueError, match="expected the columns case, image, Dice"):
        CaseResults.read_csv(bad, counted=[0])
    bad.write_text("case,image,Dice/a,HD95/b\nx,,0.5,1.0\n")
    with pytest.raises(ValueError, match="<metric>/<class> of a class of the Dice columns"):
        CaseResults.read_csv(bad, counted=[0])
    with pytest.raises(ValueError, match=r"counted must lie in \[0, 3\)"):
        CaseResults.read_csv(path, counted=[3])


def test_bad_inputs_raise():
    x = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(x, torch.zeros(1, 1, 4, 4, 3), num_classes=2)
    with pytest.raises(ValueError, match="label must hold integer values in \\[0, 2\\)"):
        case_metrics(x, x + 2, num_classes=2)
    with pytest.raises(ValueError, match="0/1 values"):
        regions = x.expand(1, 2, 4, 4, 4)
        case_metrics(regions + 3, regions, num_classes=2, multi_label=True)
    with pytest.raises(ValueError, match="mask must be"):
        case_metrics(x, x, torch.ones(1, 2, 4, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="surface_classes"):
        case_metrics(x, x, num_classes=2, surface_classes=[2])
    with pytest.raises(ValueError, match="class_names"):
        CaseMetrics(3, ["a"])
    with pytest.raises(ValueError, match="sources"):
        CaseMetrics(2).update(x, x, sources=["a", "b"])
    with pytest.raises(ValueError, match="no case"):
        case_metrics(x[:0], x[:0], num_classes=2)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor, got ndarray"):
        case_metrics(x.numpy(), x, num_classes=2)
    with pytest.raises(TypeError, match="num_classes must be an integer, got 3.0"):
        case_metrics(x, x, num_classes=3.0)
    # a NaN in a mask is not "non-zero, so counted"
    nan_mask = torch.ones(1, 1, 4, 4, 4)
    nan_mask[..., 0] = math.nan
    with pytest.raises(ValueError, match="mask contains NaN or inf"):
        case_metrics(x, x, nan_mask, num_classes=2)
    # MONAI takes voxel sizes as they come: 0 gave every distance 0, -1 the distances of 1
    for spacing in [
        (0.0, 1.0, 1.0),
        (-1.0, 1.0, 1.0),
        (math.nan, 1.0, 1.0),
        [(1, 1, 1), (1, 0, 1)],
    ]:
        with pytest.raises(ValueError, match="spacing must hold finite voxel sizes > 0"):
            case_metrics(x, x, num_classes=2, spacing=spacing, surface_classes=[1])
    # the forms MONAI takes still work: one number, per-case numpy rows; unused without surface
    cube = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    cube[..., 1:3, 1:3, 1:3] = 1
    shifted = cube.roll(1, dims=2)
    for spacing, expected in [(2.0, 2.0), ([np.array([3.0, 1.0, 1.0])], 3.0)]:
        hd95 = case_metrics(shifted, cube, num_classes=2, spacing=spacing, surface_classes=[1])
        assert hd95["HD95"][0, 1].item() == pytest.approx(expected)
    assert case_metrics(cube, cube, num_classes=2, spacing=(0.0, 0.0, 0.0))["IoU"][0, 1] == 1
    # repeated class names (or the same logged key) would overwrite each other's columns
    with pytest.raises(ValueError, match="class names must be distinct"):
        CaseMetrics(3, ["bg", "organ", "organ"])
    with pytest.raises(ValueError, match="class names must be distinct"):
        CaseMetrics(3, ["bg", "left/caudate", "left_caudate"])
    values = {"Dice": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"values\['Dice'\] must be \(cases, classes\) = \(1, 2\)"):
        CaseResults(["a"], [""], values, ["bg", "a"])
    with pytest.raises(ValueError, match="one source per case"):
        CaseResults(["a", "b"], [""], values, ["bg", "a"])
    with pytest.raises(ValueError, match=r"counted must lie in \[0, 2\), got \[5\]"):
        CaseResults(["a", "b"], ["", ""], values, ["bg", "a"], counted=[5])


# -- DDP gathering ----------------------------------------------------------------------------


#: cases of the DDP test: name -> (pred, label); rank 0 holds a, c; rank 1 holds b and a again
#: (a DistributedSampler's padding), each rank also one case without a file name ("")
LABEL = volume((6, 6, 6), [(1, (slice(1, 4), slice(1, 5)))])
GATHER_CASES = {
    name: (volume((6, 6, 6), [(1, (slice(1, 1 + k), slice(1, 5)))]), LABEL)
    for k, name in enumerate(("d/a.nii.gz", "d/b.nii.gz", "d/c.nii.gz", ""), start=1)
}
RANK_CASES = [["d/a.nii.gz", "d/c.nii.gz", ""], ["d/b.nii.gz", "d/a.nii.gz", ""]]


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = CaseMetrics(2, surface=True)
        for name in RANK_CASES[rank]:
            pred, label = GATHER_CASES[name]
            m.update(pred, label, spacing=(2.0, 1.0, 1.0), sources=[name] if name else None)
        r = m.gather()
        torch.save({"cases": r.cases, "values": r.values, "summary": r.summary()}, f"{out}{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_gather_across_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}{r}", weights_only=False) for r in range(2))
    assert r0["cases"] == r1["cases"] == ["a", "c", "case_002", "b", "case_004"]
    # the same values as in one process, in rank order, the repeated case "a" once
    order = ["d/a.nii.gz", "d/c.nii.gz", "", "d/b.nii.gz", ""]
    expected = [
        case_metrics(*GATHER_CASES[n], num_classes=2, spacing=(2.0, 1.0, 1.0), surface_classes=[1])
        for n in order
    ]
    for key in ("Dice", "IoU", "HD95", "ASD", "LabelVoxels"):
        want = torch.cat([e[key] for e in expected])
        assert_same(r0["values"][key], want)
        assert_same(r1["values"][key], want)
    assert len(set(r0["values"]["Dice"][:, 1].tolist())) > 1  # distinct cases
    for key, value in r0["summary"].items():
        assert_same(value, r1["summary"][key])
    dice = r0["values"]["Dice"][:, 1]
    assert float(r0["summary"]["mDice"]) == pytest.approx(float(dice.mean()))


# -- in the module and the CLI ----------------------------------------------------------------


def test_module_logs_dice_and_writes_the_case_table(tmp_path):
    """Trainer.validate/test on plain tensors (no file names, no spacing): val/ and test/ Dice
    are the per-case means of the predictions; surface metrics and the CSV in test only."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lovasz_monai.module import LovaszSegmentationModule

    torch.manual_seed(0)
    model = LovaszSegmentationModule(
        3,
        unet_channels=(4, 8),
        unet_strides=(2,),
        unet_num_res_units=0,
        roi_size=(8, 8, 8),
        surface_metrics=True,
    )
    assert model.surface_metrics and "surface_metrics" not in model.hparams
    g = torch.Generator().manual_seed(0)
    cases = [
        {
            "image": torch.randn(1, 8, 8, 12, generator=g),
            "label": torch.randint(0, 3, (1, 8, 8, 12), generator=g).float(),
            "mask": (torch.rand(1, 8, 8, 12, generator=g) > 0.2).float(),
        }
        for _ in range(3)
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (val,) = trainer.validate(model, DataLoader(cases, batch_size=2), verbose=False)
    assert "val/mDice" in val and not any("HD95" in k for k in val)
    assert not (tmp_path / "test_cases.csv").exists()
    preds = trainer.predict(model, DataLoader([{"image": c["image"]} for c in cases]))
    m = CaseMetrics(3, surface=True)
    for pred, c in zip(preds, cases, strict=True):
        m.update(pred.long(), c["label"][None].long(), c["mask"][None])
    summary = m.gather().summary()
    for key in ("Dice/class_0", "Dice/class_1", "Dice/class_2", "mDice"):
        assert val[f"val/{key}"] == pytest.approx(float(summary[key]), rel=1e-5)
    (tested,) = trainer.test(model, DataLoader(cases, batch_size=1), verbose=False)
    for key, value in summary.items():
        assert_same(tested[f"test/{key}"], float(value))
    rows = read_csv(tmp_path / "test_cases.csv")  # no logger: in default_root_dir
    assert [r["case"] for r in rows] == ["case_000", "case_001", "case_002"]
    assert "HD95/class_1" in rows[0] and "HD95/class_0" not in rows[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_test_csv_equals_monai_on_predicted_files(tmp_path, monkeypatch):
    """fit 2 steps -> ``test --model.surface_metrics true`` -> ``predict``: each case's Dice and
    HD95 in test_cases.csv equal MONAI's DiceMetric / HausdorffDistanceMetric on the written
    NIfTI predictions vs the label files (ignored voxels zeroed in both, voxel size from the
    file), and the logged test/Dice, test/mDice, test/HD95 are the means of the CSV columns."""
    import nibabel as nib

    from lovasz_monai.cli import LovaszCLI
    from lovasz_monai.data import SegmentationDataModule
    from lovasz_monai.synthetic import make_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lovasz-monai"])
    data = make_synthetic_dataset(tmp_path / "data", num_cases=4, num_test=1, size=(20, 20, 24))
    root = tmp_path / "runs"
    common = [
        "--config",
        str(DEMO),
        f"--data.data_dir={data}",
        "--data.roi_size=[16,16,16]",
        "--data.val_fraction=0.5",
        "--data.num_samples=1",
        "--model.unet_channels=[4,8]",
        "--model.unet_strides=[2]",
        "--model.unet_num_res_units=0",
        "--trainer.precision=32",
        "--trainer.max_epochs=2",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]
    fit = LovaszCLI(["fit", *common])
    assert "val/mDice" in fit.trainer.callback_metrics
    ckpt = root / "checkpoints" / "last.ckpt"
    test = LovaszCLI(["test", *common, f"--ckpt_path={ckpt}", "--model.surface_metrics=true"])
    logged = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    csv_dir = Path(test.trainer.log_dir)
    assert csv_dir.parent == root / "csv"
    rows = read_csv(csv_dir / "test_cases.csv")
    dm = SegmentationDataModule(data, val_fraction=0.5, roi_size=(16, 16, 16))
    val_images = [Path(c["image"]) for c in dm.val_files]
    assert [r["case"] for r in rows] == [case_id(p) for p in val_images]  # test = val split

    images = tmp_path / "images"
    images.mkdir()
    for f in val_images:
        shutil.copy(f, images / f.name)
    out = tmp_path / "predictions"
    LovaszCLI(
        [
            "predict",
            *common,
            f"--ckpt_path={ckpt}",
            f"--data.predict_images={images}",
            f"--prediction_writer.output_dir={out}",
        ]
    )

    classes = dm.class_names
    finite_hd = 0
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    for row, image in zip(rows, val_images, strict=True):
        pred = torch.as_tensor(np.asarray(nib.load(out / image.name).dataobj))[None, None]
        label_img = nib.load(data / "labelsTr" / image.name)
        label = torch.as_tensor(np.asarray(label_img.dataobj).astype(np.int64))[None, None]
        valid = label != dm.ignore_index
        assert not valid.all()  # the synthetic labels have an ignored slab
        p = one_hot_masked(pred, valid, 3)
        y = one_hot_masked(label.masked_fill(~valid, 0), valid, 3)
        spacing = [tuple(float(z) for z in label_img.header.get_zooms()[:3])]
        dice = dice_metric(p, y)[0]
        hd = hd_metric(p, y, spacing=spacing)[0]
        for c, name in enumerate(classes):
            present = bool(p[0, c].any()), bool(y[0, c].any())
            expected_dice = float(dice[c]) if any(present) else NAN
            assert_same(float(row[f"Dice/{name}"]), expected_dice)
            if c == 0:
                assert f"HD95/{name}" not in row  # the background is not counted
                continue
            expected_hd = float(hd[c]) if all(present) else (INF if any(present) else NAN)
            assert_same(float(row[f"HD95/{name}"]), expected_hd)
            finite_hd += math.isfinite(expected_hd)
    assert finite_hd > 0  # the comparison is not all NaN/inf

    # logged values: per class the mean over cases of the CSV column, then the class mean
    for metric in ("Dice", "HD95", "ASD"):
        means = {}
        for name in classes[1:] if metric != "Dice" else classes:
            column = [float(r[f"{metric}/{name}"]) for r in rows]
            means[name] = np.nanmean(column) if not np.isnan(column).all() else NAN
            assert_same(logged[f"test/{metric}/{name}"], means[name])
        fg = [means[n] for n in classes[1:]]
        expected = np.nanmean(fg) if not np.isnan(fg).all() else NAN
        assert_same(logged[f"test/m{metric}"], expected)
        if metric != "Dice":  # each case's mean over the finite values, then over cases
            case_means = []
            for r in rows:
                values = [float(r[f"{metric}/{name}"]) for name in classes[1:]]
                finite = [v for v in values if math.isfinite(v)]
                case_means += [np.mean(finite)] if finite else []
            expected = np.mean(case_means) if case_means else NAN
            assert_same(logged[f"test/m{metric}_found"], expected)
    one_sided = sum(math.isinf(float(r[f"HD95/{n}"])) for r in rows for n in classes[1:])
    assert logged["test/num_one_sided"] == one_sided
    assert "test/mIoU" in logged and "test/IoU/class_1" in logged
