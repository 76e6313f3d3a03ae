"""nnU-Net v2 trainers: the loss each builds, on the targets nnU-Net's own transforms make from
plans that nnU-Net's own planner wrote for tiny datasets; the discovery folder; and, end to end,
nnU-Net's commands (plan and preprocess, train through ``lovasz-nnunet-train``, predict through
``nnUNetv2_predict`` with the exported ``nnUNet_extTrainer``)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason='the nnunet extra: pip install -e ".[nnunet]"')

from monai.data import create_test_image_3d  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class  # noqa: E402

import lovasz_monai.nnunet as lovasz_nnunet  # noqa: E402
from lovasz_monai.losses import LovaszCELoss, LovaszSoftmaxLoss, default_loss  # noqa: E402
from lovasz_monai.module import LovaszSegmentationModule  # noqa: E402
from lovasz_monai.nnunet import (  # noqa: E402
    TRAINERS,
    IgnoreChannelLoss,
    describe_loss,
    lovasz_loss_for,
    nnUNetTrainerLovaszCE,
    nnUNetTrainerLovaszCEBatch,
)
from lovasz_monai.nnunet.cli import EXT_TRAINER, ext_trainer_value, trainer_folder  # noqa: E402

IGNORE = 3
LABELS = {"background": 0, "a": 1, "b": 2, "ignore": IGNORE}
# nnU-Net regions: "ab" is the union of labels 1 and 2, "b" label 2 alone
REGIONS = {"background": 0, "ab": [1, 2], "b": 2, "ignore": IGNORE}


def write_raw_dataset(
    folder: Path, labels: dict, cases: int = 6, size: int = 32, ignore_cases: int = 2
) -> None:
    """A dataset in nnU-Net's raw format (dataset.json v2, ``_0000`` channel suffix): spheres
    from MONAI's ``create_test_image_3d`` with labels 1 and 2, an anisotropic affine, and a slab
    of the ignore label in the first ``ignore_cases`` cases."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    for i in range(cases):
        image, label = create_test_image_3d(
            size, size, size, num_objs=4, rad_max=8, rad_min=4, num_seg_classes=2,
            noise_max=0.3, random_state=np.random.RandomState(i),
        )  # fmt: skip
        label = label.astype(np.uint8)
        if i < ignore_cases:
            label[:, :, :6] = IGNORE
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine),
                 folder / "imagesTr" / f"case{i:03d}_0000.nii.gz")  # fmt: skip
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"case{i:03d}.nii.gz")
    description = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": cases,
                   "file_ending": ".nii.gz"}  # fmt: skip
    if any(isinstance(v, list) for v in labels.values()):
        description["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(description, indent=1))


def nnunet_env(root: Path) -> dict[str, str]:
    """nnU-Net's folders under ``root``, one process for everything (a 2-core machine)."""
    return {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_def_n_proc": "1",
    }


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """nnU-Net's own fingerprint and plans of two tiny datasets: 1 = labels with an ignore
    label, 2 = regions with an ignore label. Returns ``{id: (plans, dataset_json)}``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )

    root = tmp_path_factory.mktemp("nnunet")
    write_raw_dataset(root / "raw" / "Dataset001_Labels", LABELS)
    write_raw_dataset(root / "raw" / "Dataset002_Regions", REGIONS)
    with mock.patch.dict(os.environ, nnunet_env(root)):
        extract_fingerprints([1, 2], num_processes=1, check_dataset_integrity=True)
        plan_experiments([1, 2])
    out = {"root": root}
    for dataset_id, name in ((1, "Dataset001_Labels"), (2, "Dataset002_Regions")):
        folder = root / "preprocessed" / name
        out[dataset_id] = (
            json.loads((folder / "nnUNetPlans.json").read_text()),
            json.loads((folder / "dataset.json").read_text()),
        )
    return out


def make_trainer(trainer_class, planned, dataset_id: int):
    """A trainer as ``nnUNetv2_train`` makes it (it writes its log under ``nnUNet_results``)."""
    plans, dataset_json = planned[dataset_id]
    plans = {**copy.deepcopy(plans), "continue_training": False}  # set by nnUNetv2_train
    with mock.patch.dict(os.environ, nnunet_env(planned["root"])):
        return trainer_class(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def nnunet_transforms(trainer, training: bool):
    """The transforms the trainer's data loaders use (training: with augmentation)."""
    labels = trainer.label_manager
    common = {
        "is_cascaded": False,
        "foreground_labels": labels.foreground_labels,
        "regions": labels.foreground_regions if labels.has_regions else None,
        "ignore_label": labels.ignore_label,
    }
    scales = trainer._get_deep_supervision_scales()
    if not training:
        return trainer.get_validation_transforms(scales, **common)
    rotation, dummy_2d, _, mirror_axes = (
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    )
    return trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, scales, mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, **common,
    )  # fmt: skip


def nnunet_batch(trainer, batch_size: int = 2, seed: int = 0, training: bool = False):
    """Network-shaped random logits and the targets nnU-Net's own transforms make from a label
    map with an ignore slab: per deep-supervision scale, ``(outputs, targets)``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the augmentation's random draws
    patch = trainer.configuration_manager.patch_size
    labels = trainer.label_manager
    transforms = nnunet_transforms(trainer, training)
    samples = []
    for _ in range(batch_size):
        seg = torch.randint(0, 3, (1, *patch), generator=generator, dtype=torch.int16)
        seg[..., : patch[-1] // 4] = IGNORE
        image = torch.randn(1, *patch, generator=generator)
        sample = transforms(image=image, segmentation=seg)["segmentation"]
        samples.append(sample if isinstance(sample, list) else [sample])
    targets = [torch.stack(level) for level in zip(*samples, strict=True)]
    heads = labels.num_segmentation_heads
    outputs = [
        torch.randn(batch_size, heads, *t.shape[2:], generator=generator, requires_grad=True)
        for t in targets
    ]
    return outputs, targets


def reference_loss(trainer_class, regions: bool):
    """Our loss for one resolution, written out from the documented recipe."""
    batch = trainer_class.batch
    if trainer_class.lambda_ce is None:
        if regions:
            return LovaszCELoss(sigmoid=True, lambda_ce=1.0, batch=batch)
        return LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_ce=0.3, batch=batch)
    if regions:
        return LovaszSoftmaxLoss(sigmoid=True, batch=batch)
    return LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE, batch=batch)


def call_reference(loss, output, target, regions: bool):
    if regions:  # the last channel is nnU-Net's ignore mask
        return loss(output, target[:, :-1].float(), (~target[:, -1:]).float())
    return loss(output, target.long())


@pytest.mark.parametrize("training", [False, True], ids=["val_transforms", "train_transforms"])
@pytest.mark.parametrize("dataset_id", [1, 2], ids=["labels", "regions"])
@pytest.mark.parametrize("trainer_class", TRAINERS, ids=lambda c: c.__name__)
def test_loss_is_ours_inside_nnunets_deep_supervision(planned, trainer_class, dataset_id, training):
    """The weights are the ones nnUNetTrainer builds; the value is the weighted sum of our loss
    written by hand; ignored voxels get exactly zero gradient; no input is changed. On the
    targets of nnU-Net's validation and (augmented) training transforms."""
    trainer = make_trainer(trainer_class, planned, dataset_id)
    regions = dataset_id == 2
    assert trainer.label_manager.has_regions == regions
    assert trainer.label_manager.ignore_label == IGNORE
    loss = trainer._build_loss()
    nnunet_loss = make_trainer(nnUNetTrainer, planned, dataset_id)._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper)
    assert loss.weight_factors == nnunet_loss.weight_factors
    assert len(loss.weight_factors) >= 3 and loss.weight_factors[-1] == 0

    outputs, targets = nnunet_batch(trainer, training=training)
    if regions:
        assert targets[0].dtype == torch.bool and targets[0].shape[1] == 3  # ab, b, ignore
    else:
        assert targets[0].dtype == torch.int16 and targets[0].shape[1] == 1
    before = [t.clone() for t in targets], [o.detach().clone() for o in outputs]
    value = loss(outputs, targets)
    value.backward()

    by_hand = reference_loss(trainer_class, regions)
    expected = sum(
        w * call_reference(by_hand, o.detach(), t, regions)
        for w, o, t in zip(loss.weight_factors, outputs, targets, strict=True)
        if w != 0
    )
    torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-7)
    for w, output, target in zip(loss.weight_factors, outputs, targets, strict=True):
        if w == 0:  # nnU-Net leaves the lowest resolution out
            assert output.grad is None
            continue
        ignored = target[:, -1:] if regions else target == IGNORE
        assert ignored.any() and not ignored.all()
        assert torch.count_nonzero(output.grad.masked_select(ignored.expand_as(output))) == 0
        assert torch.count_nonzero(output.grad.masked_select(~ignored.expand_as(output))) > 0
    for kept, now in zip(before[0], targets, strict=True):
        assert torch.equal(kept, now)
    for kept, now in zip(before[1], outputs, strict=True):
        assert torch.equal(kept, now.detach())


def test_the_default_recipe_is_the_lightning_modules(planned):
    """nnUNetTrainerLovaszCE trains the loss the Lightning module trains by default."""
    module_loss = LovaszSegmentationModule(num_classes=3).loss
    trainer_loss = make_trainer(nnUNetTrainerLovaszCE, planned, 1)._build_loss().loss
    assert type(trainer_loss) is type(module_loss) is LovaszCELoss
    assert trainer_loss.lambda_ce == module_loss.lambda_ce == default_loss().lambda_ce == 0.3
    assert trainer_loss.ignore_index == IGNORE


@pytest.mark.parametrize("dataset_id", [1, 2], ids=["labels", "regions"])
def test_the_batch_trainer_takes_one_lovasz_row_per_class_over_the_batch(planned, dataset_id):
    """nnUNetTrainerLovaszCEBatch: the default recipe with batch=True, which differs from the
    per-volume value on nnU-Net's batch of several patches."""
    batched = make_trainer(nnUNetTrainerLovaszCEBatch, planned, dataset_id)._build_loss()
    per_volume = make_trainer(nnUNetTrainerLovaszCE, planned, dataset_id)._build_loss()
    assert describe_loss(batched.loss).endswith("whole batch)")
    assert describe_loss(per_volume.loss).endswith("per volume)")
    outputs, targets = nnunet_batch(make_trainer(nnUNetTrainerLovaszCE, planned, dataset_id))
    assert outputs[0].shape[0] == 2
    scale = torch.tensor([1.0, 10.0]).view(2, 1, 1, 1, 1)  # unlike patches, or the values agree
    outputs = [output.detach() * scale for output in outputs]
    value = batched(outputs, targets)
    torch.testing.assert_close(
        value,
        sum(
            w
            * call_reference(
                reference_loss(nnUNetTrainerLovaszCEBatch, dataset_id == 2), o, t, dataset_id == 2
            )
            for w, o, t in zip(batched.weight_factors, outputs, targets, strict=True)
            if w != 0
        ),
    )
    assert abs(value - per_volume(outputs, targets)) > 0.01


def test_without_deep_supervision_the_loss_is_ours_alone(planned):
    trainer = make_trainer(nnUNetTrainerLovaszCE, planned, 2)
    trainer.enable_deep_supervision = False
    loss = trainer._build_loss()
    assert isinstance(loss, IgnoreChannelLoss) and loss.loss.sigmoid


def test_lovasz_loss_for_refuses_a_negative_or_non_finite_weight(planned):
    trainer = make_trainer(nnUNetTrainerLovaszCE, planned, 1)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"lambda_ce must be finite and >= 0, got {bad}"):
            lovasz_loss_for(trainer.label_manager, bad)


def test_ignore_channel_loss_names_the_shapes():
    loss = IgnoreChannelLoss(LovaszSoftmaxLoss(sigmoid=True))
    with pytest.raises(ValueError, match=r"one channel more.*\(1, 2, 4, 4, 4\).*\(1, 2, 4, 4, 4\)"):
        loss(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("trainer_class", TRAINERS, ids=lambda c: c.__name__)
def test_every_trainer_is_found_in_the_folder_the_way_nnunet_looks(trainer_class):
    """nnU-Net's own search of an ``nnUNet_extTrainer`` folder (plain modules imported as
    top-level modules) finds each trainer, as the same class."""
    found = recursive_find_python_class(
        str(trainer_folder()), trainer_class.__name__, None,
        base_folder=str(trainer_folder()), cleanup_imports_from_base_folder=True,
    )  # fmt: skip
    assert found is trainer_class
    assert issubclass(found, nnUNetTrainer)


def test_short_variants_change_only_the_length(planned):
    runs = {c.__name__: make_trainer(c, planned, 1) for c in TRAINERS}
    lengths = {n: (t.num_epochs, t.num_iterations_per_epoch) for n, t in runs.items()}
    assert lengths["nnUNetTrainerLovaszCE"] == (1000, 250)
    assert lengths["nnUNetTrainerLovaszCE_5epochs"] == (5, 250)
    assert lengths["nnUNetTrainerLovasz_5epochs"] == (5, 250)
    assert lengths["nnUNetTrainerLovasz_tiny"] == (2, 3)
    assert runs["nnUNetTrainerLovaszCE_tiny"].num_val_iterations_per_epoch == 1
    assert runs["nnUNetTrainerLovasz_tiny"].lambda_ce == 0.0
    assert runs["nnUNetTrainerLovaszCE_5epochs"].lambda_ce is None  # the default recipe
    # nnU-Net re-creates a trainer from its saved init arguments (checkpoints, prediction)
    assert set(runs["nnUNetTrainerLovaszCE_tiny"].my_init_kwargs) == {
        "plans", "configuration", "fold", "dataset_json", "device"
    }  # fmt: skip


def test_ext_trainer_value_puts_ours_first_and_keeps_the_users_folders():
    ours = str(trainer_folder())
    listed = os.pathsep.join(["/a", "", ours, "/b"])
    assert ext_trainer_value({EXT_TRAINER: listed}).split(os.pathsep) == [ours, "/a", "/b"]
    assert ext_trainer_value({}) == ours


def test_the_wrappers_stop_with_the_fix_when_torchvision_does_not_import(monkeypatch):
    from lovasz_monai.nnunet.cli import check_trainer_lookup

    monkeypatch.setitem(sys.modules, "torchvision", None)  # an import of it raises ImportError
    with pytest.raises(SystemExit, match=r"imports torchvision.*ModuleNotFoundError.*--index-url"):
        check_trainer_lookup()


def test_an_old_nnunetv2_is_refused_with_the_version_and_the_fix(monkeypatch):
    monkeypatch.setattr(lovasz_nnunet.metadata, "version", lambda name: "2.6.4")
    with pytest.raises(ImportError, match=r"nnunetv2 >= 2\.8.*found 2\.6\.4.*pip install -U"):
        lovasz_nnunet.require_nnunetv2()


# -- end to end: nnU-Net's own commands --------------------------------------------------------

#: nnU-Net's trainer lookup imports every module of its own trainer folder before it looks in
#: nnUNet_extTrainer; one of them (Primus) imports timm, which imports torchvision. PyPI's
#: torchvision wheels are CUDA builds that do not import next to a CPU torch, and a machine
#: without a network has no CPU build to install. Only there, the end-to-end test puts this
#: stand-in on the path of nnU-Net's processes (it is never imported by the test process).
TORCHVISION_STAND_IN = '''"""A torchvision stand-in: any name in it is an empty class."""
import importlib.abc, importlib.machinery, sys


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything(name, (), {})


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__getattr__, module.__path__ = __getattr__, []


sys.meta_path.insert(0, _Submodules())
'''


def torchvision_imports() -> bool:
    code = "import torchvision"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def command(name: str) -> str:
    """A console script installed next to this Python (nnU-Net's and ours)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[nnunet]'")
    return path


@pytest.mark.slow
def test_nnunet_commands_train_and_predict_with_our_trainer(tmp_path):
    """As a user types it: plan and preprocess, ``lovasz-nnunet-train`` (the wrapper), then
    ``nnUNetv2_predict`` with ``export nnUNet_extTrainer=$(lovasz-nnunet-folder)``."""
    raw = tmp_path / "raw" / "Dataset001_Labels"
    write_raw_dataset(raw, LABELS)
    env = {**os.environ, **nnunet_env(tmp_path), "nnUNet_n_proc_DA": "0"}
    env.pop(EXT_TRAINER, None)
    if not torchvision_imports():
        stand_in = tmp_path / "stand_in" / "torchvision"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text(TORCHVISION_STAND_IN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_in.parent),
                                                          env.get("PYTHONPATH")]))  # fmt: skip

    def run(*args, **extra_env):
        done = subprocess.run(args, env={**env, **extra_env}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    plan = [command("nnUNetv2_plan_and_preprocess"), "-d", "1", "-c", "3d_fullres"]
    run(*plan, "-npfp", "1", "-np", "1", "--verify_dataset_integrity", nnUNet_n_proc_DA="1")
    trainer = "nnUNetTrainerLovaszCE_tiny"
    log = run(command("lovasz-nnunet-train"), "1", "3d_fullres", "0", "-tr", trainer,
              "-device", "cpu")  # fmt: skip
    assert f"Using trainer '{trainer}' from: {trainer_folder()}" in log
    assert "Lovász loss (lovasz_monai): LovaszCELoss(softmax, lambda_ce=0.3, ignore_index=3" in log
    model = tmp_path / "results" / "Dataset001_Labels" / f"{trainer}__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()

    folder = run(command("lovasz-nnunet-folder")).strip()
    assert folder == str(trainer_folder())
    inputs = tmp_path / "imagesTs"
    inputs.mkdir()
    shutil.copy(raw / "imagesTr" / "case000_0000.nii.gz", inputs)
    predict = [command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp_path / "pred")]
    predict += ["-d", "1", "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu"]
    run(*predict, "-chk", "checkpoint_final.pth", "--disable_tta", "-npp", "1", "-nps", "1",
        **{EXT_TRAINER: folder})  # fmt: skip

    source = nib.load(raw / "imagesTr" / "case000_0000.nii.gz")
    prediction = nib.load(tmp_path / "pred" / "case000.nii.gz")
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
    values = set(np.unique(np.asarray(prediction.dataobj)).tolist())
    assert values <= {0, 1, 2}, values  # labels only: never the ignore label


# -- MSD layout -> nnU-Net raw ------------------------------------------------------------------


def test_converted_dataset_passes_nnunets_own_check_with_the_ignore_label_moved(tmp_path):
    """Labels equal the source except that the ignore label (255) and voxels outside a case's
    mask become C; images keep data and affine; 2-channel images are split; nnU-Net's
    ``verify_dataset_integrity`` accepts the result."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from lovasz_monai.nnunet.convert import to_nnunet_raw
    from lovasz_monai.synthetic import make_synthetic_dataset

    msd = make_synthetic_dataset(tmp_path / "msd", num_cases=3, num_test=1, size=(12, 10, 8),
                                 num_modalities=2, roi_masks=True)  # fmt: skip
    out = to_nnunet_raw(msd, tmp_path / "raw", 12)
    assert out == tmp_path / "raw" / "Dataset012_msd"
    info = json.loads((out / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "class_1": 1, "class_2": 2, "ignore": 3}
    assert info["numTraining"] == 3 and info["file_ending"] == ".nii.gz"
    assert len(info["channel_names"]) == 2

    source = json.loads((msd / "dataset.json").read_text())
    case = source["training"][0]
    stem = Path(case["label"]).name.removesuffix(".nii.gz")
    label = np.asarray(nib.load(msd / case["label"]).dataobj)
    mask = np.asarray(nib.load(msd / case["mask"]).dataobj)
    expected = np.where((label == 255) | (mask == 0), 3, label)
    written = nib.load(out / "labelsTr" / f"{stem}.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    assert (expected == 3).any() and (expected != 3).any()
    image = nib.load(msd / case["image"])
    for c in range(2):
        channel = nib.load(out / "imagesTr" / f"{stem}_{c:04d}.nii.gz")
        np.testing.assert_array_equal(
            np.asarray(channel.dataobj), np.asarray(image.dataobj)[..., c]
        )
        np.testing.assert_allclose(channel.affine, image.affine)
    source_label = nib.load(msd / case["label"])
    np.testing.assert_allclose(written.affine, source_label.affine)
    assert written.header.get_qform(coded=True)[1] == source_label.header.get_qform(coded=True)[1]
    assert written.header.get_sform(coded=True)[1] == source_label.header.get_sform(coded=True)[1]
    test_stem = Path(source["test"][0]).name.removesuffix(".nii.gz")
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        f"{test_stem}_0000.nii.gz", f"{test_stem}_0001.nii.gz"
    ]  # fmt: skip
    verify_dataset_integrity(str(out), num_processes=1)


def test_conversion_refuses_what_nnunet_could_not_read(tmp_path):
    from lovasz_monai.nnunet.convert import to_nnunet_raw
    from lovasz_monai.synthetic import make_synthetic_dataset

    msd = make_synthetic_dataset(tmp_path / "msd", num_cases=2, num_test=0, size=(8, 8, 8))
    with pytest.raises(ValueError, match="dataset ids are 1..999, got 1000"):
        to_nnunet_raw(msd, tmp_path / "raw", 1000)
    to_nnunet_raw(msd, tmp_path / "raw", 3)
    with pytest.raises(FileExistsError, match="Dataset003_msd exists"):
        to_nnunet_raw(msd, tmp_path / "raw", 3, name="Other")  # nnU-Net: one name per id
    info = json.loads((msd / "dataset.json").read_text())
    info["labels"] = {"background": 0, "a": [1, 2], "b": 2, "ignore": 255}
    (msd / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="regions"):
        to_nnunet_raw(msd, tmp_path / "raw", 4)


def test_convert_command_writes_under_nnunet_raw(tmp_path, monkeypatch, capsys):
    from lovasz_monai.nnunet.cli import convert_main
    from lovasz_monai.synthetic import make_synthetic_dataset

    msd = make_synthetic_dataset(tmp_path / "msd", num_cases=2, num_test=0, size=(8, 8, 8))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    convert_main([str(msd), "--id", "5", "--name", "Demo"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "raw" / "Dataset005_Demo")
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(SystemExit):
        convert_main([str(msd), "--id", "6"])
    assert "set nnUNet_raw or pass --raw" in capsys.readouterr().err


def _kits_like(root: Path, cases: int, tests: int) -> Path:
    """An MSD-layout dataset.json over the KiTS layout: one folder per case, the same file
    names in every folder (``case_0000i/imaging.nii.gz``, ``case_0000i/segmentation.nii.gz``);
    case ``i`` is labelled ``i % 3`` with a corner of the ignore label 255."""
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    training, test = [], []
    for i in range(cases + tests):
        folder = root / f"case_{i:05d}"
        folder.mkdir(parents=True)
        image = np.full((6, 5, 4), float(i), dtype=np.float32)
        label = np.full((6, 5, 4), i % 3, dtype=np.uint8)
        label[:2, :2, :2] = 255
        nib.save(nib.Nifti1Image(image, affine), folder / "imaging.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "segmentation.nii.gz")
        case = {
            "image": f"case_{i:05d}/imaging.nii.gz",
            "label": f"case_{i:05d}/segmentation.nii.gz",
        }
        (training if i < cases else test).append(case)
    info = {
        "name": "kits", "modality": {"0": "CT"}, "training": training, "test": test,
        "labels": {"0": "background", "1": "kidney", "2": "tumor", "255": "ignore"},
    }  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_conversion_keeps_every_case_when_file_names_repeat_in_case_folders(tmp_path):
    """KiTS layout: every label is ``segmentation.nii.gz``; the cases used to overwrite each
    other (one file written, ``numTraining`` 3). The case folders are the identifiers now."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from lovasz_monai.nnunet.convert import to_nnunet_raw

    msd = _kits_like(tmp_path / "kits", cases=3, tests=2)
    out = to_nnunet_raw(msd, tmp_path / "raw", 64)
    info = json.loads((out / "dataset.json").read_text())
    names = [f"case_{i:05d}" for i in range(3)]
    assert info["numTraining"] == 3
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{n}.nii.gz" for n in names]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        f"{n}_0000.nii.gz" for n in names
    ]
    for i, name in enumerate(names):  # each file holds its own case
        image = np.asarray(nib.load(out / "imagesTr" / f"{name}_0000.nii.gz").dataobj)
        assert (image == i).all()
        label = np.asarray(nib.load(out / "labelsTr" / f"{name}.nii.gz").dataobj)
        assert (label[2:] == i % 3).all() and (label[:2, :2, :2] == 3).all()
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        "case_00003_0000.nii.gz", "case_00004_0000.nii.gz"
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [
        "case_00003.nii.gz", "case_00004.nii.gz"
    ]  # fmt: skip
    test_label = np.asarray(nib.load(out / "labelsTs" / "case_00004.nii.gz").dataobj)
    assert (test_label[2:] == 4 % 3).all()
    verify_dataset_integrity(str(out), num_processes=1)


def test_case_identifiers_are_unique_or_refused(tmp_path):
    from lovasz_monai.nnunet.convert import case_identifiers, to_nnunet_raw

    unique = ["l/case_1.nii.gz", "m/case_2.nii.gz"]
    assert case_identifiers(unique) == ["case_1", "case_2"]  # file names kept when unique
    nested = ["k/a/x/seg.nii.gz", "k/b/x/seg.nii.gz", "k/b/x/ct.nii"]
    assert case_identifiers(nested) == ["a_x_seg", "b_x_seg", "b_x_ct"]
    with pytest.raises(ValueError, match=r"'x_seg': .*x/seg\.nii\.gz, .*x/seg\.nii"):
        case_identifiers(["k/x/seg.nii.gz", "k/x/seg.nii", "k/y/ct.nii.gz"], "training labels")
    # a label listed twice: refused before anything is written
    msd = _kits_like(tmp_path / "kits", cases=2, tests=0)
    info = json.loads((msd / "dataset.json").read_text())
    info["training"].append(info["training"][0])
    (msd / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"training labels .*case_00000_segmentation"):
        to_nnunet_raw(msd, tmp_path / "raw", 65)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "name", ["nnUNetTrainerLovaszCE", "nnUNetTrainerLovasz_tiny", "nnUNetTrainerLovaszCEBatch"]
)
def test_mirroring_lateralised_labels_warns_and_names_the_trainer_without(planned, name):
    """nnU-Net mirrors every axis: with labels that say left or right the trainer warns (and
    logs) and names its no-mirroring variant; without such labels it stays quiet."""
    trainer = make_trainer(getattr(lovasz_nnunet, name), planned, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lateralised label here: no warning
        *_, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert tuple(mirror_axes) == (0, 1, 2) == tuple(trainer.inference_allowed_mirroring_axes)
    trainer.dataset_json = {**trainer.dataset_json, "labels": {"background": 0, "Left-Caudate": 1}}
    unmirrored = f"{name.split('_')[0]}_noMirroring"  # the same loss, no mirroring
    with pytest.warns(
        UserWarning, match=rf"mirrors axes \(0, 1, 2\).*Left-Caudate.*{unmirrored}\."
    ):
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()


@pytest.mark.parametrize(
    "trainer_class",
    [
        lovasz_nnunet.nnUNetTrainerLovaszCE_noMirroring,
        lovasz_nnunet.nnUNetTrainerLovasz_noMirroring,
        lovasz_nnunet.nnUNetTrainerLovaszCEBatch_noMirroring,
    ],
    ids=lambda c: c.__name__,
)
def test_no_mirroring_variants_mirror_nothing_in_training_or_at_test_time(planned, trainer_class):
    """As nnU-Net's nnUNetTrainerNoMirroring: no mirror axes for the augmentation, none for
    test-time mirroring; the rest of nnU-Net's settings and the loss as their parent's."""
    trainer = make_trainer(trainer_class, planned, 1)
    trainer.dataset_json = {**trainer.dataset_json, "labels": {"background": 0, "kidney_r": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lateralised, but nothing is mirrored: no warning
        *settings, mirror_axes = (
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
    parent = make_trainer(trainer_class.__mro__[1], planned, 1)
    *parent_settings, _ = parent.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert repr(settings) == repr(parent_settings)
    assert trainer.lambda_ce == parent.lambda_ce
    assert describe_loss(trainer._build_loss().loss) == describe_loss(parent._build_loss().loss)
