"""DatasetDescription.from_json and split_cases: dataset.json and the split, without Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lovasz_monai.dataset import DatasetDescription, split_cases
from lovasz_monai.synthetic import make_synthetic_dataset

IGNORE = 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """3 labelled cases + 2 test images of 8^3, 3 classes, ignore label 255."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("tiny"), num_cases=3, num_test=2, size=(8, 8, 8)
    )


def _with_json(tiny: Path, tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A copy of tiny's dataset.json in tmp_path (absolute paths), ``changes`` applied and the
    keys ``drop`` removed."""
    info = json.loads((tiny / "dataset.json").read_text())
    info["training"] = [{k: str(tiny / v) for k, v in case.items()} for case in info["training"]]
    info["test"] = [str(tiny / p) for p in info["test"]]
    info.update(changes)
    for key in drop:
        del info[key]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(info))
    return path


def test_msd_labels(tiny):
    desc = DatasetDescription.from_json(tiny)  # the folder or the file
    assert desc == DatasetDescription.from_json(tiny / "dataset.json")
    assert desc.root == tiny
    assert desc.label_names == desc.class_names == ("background", "class_1", "class_2")
    assert desc.num_classes == 3 and desc.ignore_index == IGNORE and desc.in_channels == 1
    assert not desc.multi_label and desc.regions is None
    assert [Path(c["image"]).name for c in desc.training] == [
        f"case_00{i}.nii.gz" for i in range(3)
    ]
    assert all(set(c) == {"image", "label"} and Path(c["label"]).is_file() for c in desc.training)
    assert desc.test == () and [Path(p).name for p in desc.predict_images] == [
        "test_000.nii.gz",
        "test_001.nii.gz",
    ]
    with pytest.raises(AttributeError):
        desc.ignore_index = 0  # frozen


def test_nnunet_labels_channels_and_override(tiny, tmp_path):
    labels = {"background": 0, "liver": 1, "tumour": 2, "ignore": 7}
    channels = {"0": "CT", "1": "PET"}
    path = _with_json(tiny, tmp_path, ("modality",), labels=labels, channel_names=channels)
    desc = DatasetDescription.from_json(path)
    assert desc.class_names == ("background", "liver", "tumour") and desc.ignore_index == 7
    assert desc.in_channels == 2 and not desc.multi_label
    assert DatasetDescription.from_json(path, ignore_index=IGNORE).ignore_index == IGNORE
    with pytest.raises(ValueError, match="is a class index of .*dataset.json"):
        DatasetDescription.from_json(path, ignore_index=1)


def test_no_ignore_label(tiny, tmp_path):
    path = _with_json(tiny, tmp_path, labels={"0": "background", "1": "a", "2": "b"})
    assert DatasetDescription.from_json(path).ignore_index is None


def test_regions(tiny, tmp_path):
    labels = {"background": 0, "whole": [1, 2], "core": 2, "ignore": IGNORE}
    desc = DatasetDescription.from_json(_with_json(tiny, tmp_path, labels=labels))
    assert desc.multi_label and desc.class_names == ("whole", "core") and desc.num_classes == 2
    assert desc.regions == {"whole": (1, 2), "core": (2,)} and desc.label_names == ("0", "1", "2")
    given = DatasetDescription.from_json(tiny, regions={"fg": [1, 2], "two": 2})
    assert given.regions == {"fg": (1, 2), "two": (2,)} and given.class_names == ("fg", "two")
    with pytest.raises(ValueError, match="label values in"):
        DatasetDescription.from_json(tiny, regions={"bad": [3]})
    with pytest.raises(ValueError, match="regions is empty"):
        DatasetDescription.from_json(tiny, regions={})


@pytest.mark.parametrize("background", [[0], [0, 0]])
def test_background_given_as_a_list_stays_the_background(tiny, tmp_path, background):
    """nnU-Net v2 allows ``"background": [0]``: it is not a region."""
    labels = {"background": background, "whole": [1, 2], "core": 2}
    desc = DatasetDescription.from_json(_with_json(tiny, tmp_path, labels=labels))
    assert desc.class_names == ("whole", "core") and desc.regions == {"whole": (1, 2), "core": (2,)}


@pytest.mark.parametrize(
    "labels",
    [
        {"0": "background", "1": "organ", "2": "organ"},  # MSD
        {"background": 0, "left/caudate": 1, "left_caudate": 2},  # the same logged key
        {"background": 0, "a/b": [1, 2], "a_b": 2},  # regions
    ],
)
def test_class_names_that_would_overwrite_each_others_metrics_are_refused(tiny, tmp_path, labels):
    with pytest.raises(ValueError, match=r"dataset.json: 'labels': class names must be distinct"):
        DatasetDescription.from_json(_with_json(tiny, tmp_path, labels=labels))


def test_labelled_test_cases(tiny, tmp_path):
    case = {
        "image": str(tiny / "imagesTr/case_000.nii.gz"),
        "label": str(tiny / "labelsTr/case_000.nii.gz"),
    }
    desc = DatasetDescription.from_json(_with_json(tiny, tmp_path, test=[case]))
    assert desc.test == (case,) and desc.predict_images == (case["image"],)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"labels": {"0": "background", "2": "gap"}}, ValueError, "without gaps"),
        ({"labels": {"background": 0, "a": "x"}}, ValueError, "must map index strings"),
        ({"labels": []}, ValueError, "non-empty mapping"),
        ({"modality": []}, ValueError, "'modality' must be a non-empty mapping"),
        ({"training": [{"image": "x.nii.gz"}]}, ValueError, "'training' entry 0"),
        ({"test": "x"}, ValueError, "'test' must be a list"),
        ({"test": ["missing.nii.gz"]}, FileNotFoundError, "missing.nii.gz"),
    ],
)
def test_errors_name_dataset_json(tiny, tmp_path, changes, error, match):
    with pytest.raises(error, match=match) as err:
        DatasetDescription.from_json(_with_json(tiny, tmp_path, **changes))
    assert "dataset.json" in str(err.value)


def test_missing_or_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        DatasetDescription.from_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(ValueError, match="dataset.json is not valid JSON"):
        DatasetDescription.from_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'labels' entry"):
        DatasetDescription.from_json(tmp_path)


def test_check_files_off(tiny, tmp_path):
    path = _with_json(tiny, tmp_path, test=["missing.nii.gz"])
    desc = DatasetDescription.from_json(path, check_files=False)
    assert desc.predict_images == (str(tmp_path / "missing.nii.gz"),)


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [(10, 0.3, 3), (10, 0.01, 1), (10, 0.0, 0), (2, 0.9, 1), (1, 0.5, 0), (0, 0.2, 0)],
)
def test_split_sizes(n, fraction, n_val):
    cases = [f"case_{i}" for i in range(n)]
    train, val = split_cases(cases, fraction, seed=0)
    assert len(val) == n_val and sorted(train + val) == cases
    assert train == sorted(train) and val == sorted(val)  # input order kept


def test_split_deterministic():
    cases = list(range(20))
    splits = {seed: split_cases(cases, 0.25, seed) for seed in range(5)}
    assert all(split_cases(cases, 0.25, seed) == splits[seed] for seed in splits)
    assert len({tuple(val) for _, val in splits.values()}) > 1  # the seed matters
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_cases(cases, 1.0)


def test_no_lightning_import():
    code = (
        "import sys, lovasz_monai.dataset, lovasz_monai.synthetic; "
        "print(any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
