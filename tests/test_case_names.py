"""Case names from file paths (``lovasz_monai.case_names``), hand-checked layouts."""

import os

import pytest

from lovasz_monai.case_names import case_id, nifti_stem, repeated_names_root, unique_case_names


def test_stems():
    assert case_id("/d/imagesTr/liver_7.nii.gz") == "liver_7"
    assert case_id("scan.v2.mha") == "scan.v2" and case_id("ct.nrrd.bz2") == "ct"
    assert case_id("patient_01") == "patient_01" and case_id(".hidden") == ".hidden"
    assert nifti_stem("a/ct_1.nii.gz") == "ct_1" and nifti_stem("c.mha") == "c.mha"


def test_msd_layout_keeps_file_names():
    paths = ["d/imagesTs/liver_1.nii.gz", "e/imagesTs/liver_2.nii.gz"]
    assert repeated_names_root(paths) is None
    assert unique_case_names(paths) == ["liver_1", "liver_2"]


def test_case_folders_name_the_cases_when_file_names_repeat(tmp_path):
    paths = [tmp_path / f"kits/case_{i:05d}/imaging.nii.gz" for i in (3, 0, 12)]
    assert repeated_names_root(paths) == os.fspath(tmp_path / "kits")
    assert unique_case_names(paths) == ["case_00003", "case_00000", "case_00012"]
    # folders that repeat too: folders and file name
    nested = ["k/a/x/seg.nii.gz", "k/b/x/seg.nii.gz", "k/b/x/ct.mha"]
    assert unique_case_names(nested) == ["a_x_seg", "b_x_seg", "b_x_ct"]
    # one file at the common folder, the other below it
    assert unique_case_names(["k/seg.nii", "k/b/seg.nii"]) == ["seg", "b_seg"]


def test_stem_decides_what_repeats():
    paths = ["k/a/ct.nii.gz", "k/b/ct.mha"]
    assert unique_case_names(paths) == ["a", "b"]  # case_id: both "ct"
    assert unique_case_names(paths, nifti_stem) == ["ct", "ct.mha"]


def test_names_that_stay_ambiguous_are_refused():
    with pytest.raises(ValueError, match=r"the test images .*'x_seg': k/x/seg\.nii\.gz, k/x/seg"):
        unique_case_names(["k/x/seg.nii.gz", "k/x/seg.nii", "k/y/ct.nii.gz"], what="test images")
    with pytest.raises(ValueError, match="'a_ct'"):
        unique_case_names(["k/a/ct.nii.gz", "k/a/ct.nii.gz", "k/b/ct.nii.gz"])
    # strict=False: only the names that clash repeat
    paths = ["k/c0/imaging.nii.gz", "k/c1/imaging.nii.gz", "k/c1/imaging.nii"]
    assert unique_case_names(paths, strict=False) == ["c0_imaging", "c1_imaging", "c1_imaging"]


def test_names_depend_on_the_other_paths():
    assert unique_case_names(["k/case_0/imaging.nii.gz"]) == ["imaging"]
    two = ["k/case_0/imaging.nii.gz", "k/case_1/imaging.nii.gz"]
    assert unique_case_names(two) == ["case_0", "case_1"]
