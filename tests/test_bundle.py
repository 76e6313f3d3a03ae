"""End-to-end run of the example MONAI bundle in ``configs/bundle``.

The bundle trains a small 3D UNet with ``monai.engines.SupervisedTrainer`` and
``lovasz_monai.LovaszCELoss`` on synthetic data that it writes itself, validates with a
``SupervisedEvaluator`` (mean IoU), saves checkpoints, and ``inference.json`` writes NIfTI
predictions for the dataset's test images. Here both configs run in ``tmp_path`` with the
dataset and output folders overridden, as ``python -m monai.bundle run ... --dataset_dir ...``
would.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import EnsureTyped, NormalizeIntensity, RandFlipd

from lovasz_monai import LovaszCELoss

BUNDLE = Path(__file__).resolve().parents[1] / "configs" / "bundle"
TRAIN = str(BUNDLE / "train.json")
INFERENCE = str(BUNDLE / "inference.json")
META = str(BUNDLE / "metadata.json")
EPOCHS = 4
ITERATIONS_PER_EPOCH = 4  # 10 synthetic cases, 2 for validation, batch size 2


@pytest.fixture
def restore_global_state():
    """The bundle seeds the global RNGs (``monai.utils.set_determinism``), sets cuDNN flags and
    puts its folder on ``sys.path``; give the other tests back what they had."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    path = list(sys.path)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    sys.path[:] = path


def _record(trainer):
    """Per-iteration loss, and ignored voxels / largest label in each training batch."""
    losses, ignored, max_label = [], [], []

    def before(engine):
        ignored.append(int((engine.state.batch["mask"] == 0).sum()))
        max_label.append(float(engine.state.batch["label"].max()))

    def after(engine):
        losses.append(float(engine.state.output[0]["loss"]))

    trainer.add_event_handler(Events.ITERATION_STARTED, before)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, after)
    return losses, ignored, max_label


def _reference_prediction(network: torch.nn.Module, image_file: Path) -> np.ndarray:
    """The prediction computed by hand: normalise, reorient to RAS (the synthetic affine flips
    the first two axes), sliding window as in inference.json, argmax, back to file order."""
    image = nib.load(image_file)
    assert np.all(np.sign(np.diag(image.affine)[:3]) == [-1, -1, 1])
    array = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))[None]
    array = NormalizeIntensity(nonzero=True, channel_wise=True)(array)
    ras = torch.flip(torch.as_tensor(array), dims=(1, 2))[None]
    with torch.no_grad():
        logits = sliding_window_inference(
            ras, roi_size=(24, 24, 24), sw_batch_size=4, predictor=network, overlap=0.25
        )
    label = logits.argmax(1)[0]
    return torch.flip(label, dims=(0, 1)).numpy().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # MONAI's trust warning
def test_bundle_train_and_inference(tmp_path, restore_global_state):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    overrides = {"dataset_dir": str(data_dir), "output_dir": str(out_dir)}

    # ---- training: ConfigWorkflow, so that the trainer can be inspected -------------------
    wf = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, workflow_type="train", epochs=EPOCHS, **overrides
    )
    wf.initialize()  # seeds, writes the synthetic dataset
    assert wf.check_properties() == []  # every required/optional train property is in place
    info = json.loads((data_dir / "dataset.json").read_text())
    assert info["numTraining"] == 10 and len(info["test"]) == 2
    assert info["labels"]["255"] == "ignore"

    trainer = wf.trainer
    losses, ignored, max_label = _record(trainer)
    wf.run()
    wf.finalize()

    assert trainer.state.epoch == EPOCHS
    assert len(losses) == EPOCHS * ITERATIONS_PER_EPOCH
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.6 * first, f"training loss did not decrease: {losses}"
    # IgnoreMaskd turned the 255 slab into mask zeros and a valid label map.
    assert sum(ignored) > 0
    assert max(max_label) <= 2.0

    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.best_metric_epoch in range(1, EPOCHS + 1)
    assert 0.0 < evaluator.state.best_metric <= 1.0

    network = wf.parser.get_parsed_content("network")
    final = torch.load(out_dir / "models" / "model_final.pt", map_location="cpu")
    assert final.keys() == network.state_dict().keys()
    assert all(torch.equal(final[k], v.cpu()) for k, v in network.state_dict().items())
    best_file = out_dir / "models" / "model.pt"
    assert best_file.is_file()

    # The loss gets the mask: same value as ignore_index=255 on the raw label map.
    batch = next(iter(wf.parser.get_parsed_content("train#dataloader")))
    label, mask = batch["label"], batch["mask"]
    assert bool((mask == 0).any())
    logits = torch.randn(
        label.shape[0], 3, *label.shape[2:], generator=torch.Generator().manual_seed(0)
    )
    bundle_loss = wf.parser.get_parsed_content("train#loss_function")(
        logits, {"label": label, "mask": mask}
    )
    raw = torch.where(mask == 0, torch.full_like(label, 255), label)
    expected = LovaszCELoss(to_onehot_y=True, ignore_index=255)(logits, raw)
    torch.testing.assert_close(bundle_loss, expected)

    # ---- inference: through monai.bundle.run, as the command line does ---------------------
    infer_wf = ConfigWorkflow(
        config_file=INFERENCE, meta_file=META, workflow_type="inference", **overrides
    )
    infer_wf.initialize()
    assert infer_wf.check_properties() == []
    bundle_run(config_file=INFERENCE, meta_file=META, **overrides)

    net = UNet(3, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    net.load_state_dict(torch.load(best_file, map_location="cpu"))
    net.eval()
    predictions = sorted((out_dir / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["test_000_seg.nii.gz", "test_001_seg.nii.gz"]
    for entry, pred_file in zip(info["test"], predictions, strict=True):
        image_file = data_dir / entry
        image, pred = nib.load(image_file), nib.load(pred_file)
        assert pred.shape == image.shape == (32, 32, 32)
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        assert pred.get_data_dtype() == np.uint8
        values = np.asarray(pred.dataobj)
        assert set(np.unique(values)) <= {0, 1, 2}
        np.testing.assert_array_equal(values, _reference_prediction(net, image_file))


@pytest.mark.slow
def test_bundle_command_line_as_the_readme_gives_it(tmp_path):
    """`python -m monai.bundle run --config_file configs/bundle/train.json ...` (the README's
    command) trains one epoch and writes the checkpoints; the inference command writes the
    predictions."""
    common = [f"--dataset_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}"]
    for config, extra in ((TRAIN, ["--epochs=1"]), (INFERENCE, [])):
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
            + ["--meta_file", str(META), *common, *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "models" / "model.pt").is_file()
    assert (tmp_path / "out" / "models" / "model_final.pt").is_file()
    assert len(list((tmp_path / "out" / "predictions").glob("*.nii.gz"))) == 2


def test_bundle_flips_nothing_unless_asked():
    """Like ``flip_axes`` of the datamodule: no random flips by default (after ``Orientationd``
    axis 0 is left-right, and a flip there breaks left/right labels); ``flip_axes`` adds one
    ``RandFlipd`` per axis, before the tensors are made."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert "RandFlipd" not in names and names[-2:] == ["RandCropByPosNegLabeld", "EnsureTyped"]
    parser["flip_axes"] = [1, 2]
    transforms = parser.get_parsed_content("train#preprocessing", lazy=False).transforms
    flips = [t for t in transforms if isinstance(t, RandFlipd)]
    assert [f.flipper.spatial_axis for f in flips] == [1, 2]
    assert [f.prob for f in flips] == [0.5, 0.5] and isinstance(transforms[-1], EnsureTyped)
