"""The losses where a MONAI loss is used: bundle configs, deep supervision, LightningCLI configs."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from jsonargparse import ArgumentParser
from monai.bundle import ConfigParser
from monai.losses import DeepSupervisionLoss

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from tests.oracle import ref_lovasz_softmax


def _case(seed=0, batch=2, channels=3, size=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, channels, size, size, size, generator=g)
    labels = torch.randint(0, channels, (batch, 1, size, size, size), generator=g)
    return logits, labels


def test_bundle_config_parser():
    parser = ConfigParser(
        {"loss": {"_target_": "lovasz_monai.LovaszSoftmaxLoss", "to_onehot_y": True}}
    )
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, LovaszSoftmaxLoss)
    assert loss.to_onehot_y is True
    logits, labels = _case()
    value = loss(logits, labels)
    expected = ref_lovasz_softmax(torch.softmax(logits.double(), 1), labels[:, 0], per_image=True)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_bundle_config_parser_all_losses_with_arguments():
    config = {
        "softmax": {
            "_target_": "lovasz_monai.LovaszSoftmaxLoss",
            "to_onehot_y": True,
            "ignore_index": 255,
            "batch": True,
            "weight": [1.0, 2.0, 3.0],
            "method": "histogram",
            "bins": 256,
        },
        "hinge": {"_target_": "lovasz_monai.LovaszHingeLoss", "reduction": "sum"},
        "ce": {
            "_target_": "lovasz_monai.LovaszCELoss",
            "to_onehot_y": True,
            "lambda_ce": 0.5,
            "ce_weight": [1.0, 1.0, 2.0],
            "ignore_index": 255,
        },
    }
    parser = ConfigParser(config)
    softmax = parser.get_parsed_content("softmax")
    assert softmax.ignore_index == 255 and softmax.batch and softmax.method == "histogram"
    assert softmax.bins == 256
    torch.testing.assert_close(softmax.class_weight, torch.tensor([1.0, 2.0, 3.0]))
    assert parser.get_parsed_content("hinge").reduction == "sum"
    ce = parser.get_parsed_content("ce")
    assert ce.lambda_ce == 0.5
    logits, labels = _case(1)
    labels[0, 0, 0] = 255
    for name in ("softmax", "ce"):
        value = parser.get_parsed_content(name)(logits, labels)
        assert value.ndim == 0 and torch.isfinite(value)


def _nearest_exact_downsample(target, factor):
    """Nearest-exact sampling by hand: output voxel i reads input floor((i + 0.5) * factor)."""
    start = factor // 2
    return target[:, :, start::factor, start::factor, start::factor]


@pytest.mark.parametrize(
    ("weight_mode", "weights", "expected_weights"),
    [
        ("exp", None, [1.0, 0.5, 0.25]),
        ("same", None, [1.0, 1.0, 1.0]),
        ("two", None, [1.0, 0.5, 0.5]),
        ("exp", [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]),
    ],
)
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        lambda: LovaszCELoss(to_onehot_y=True),
        lambda: LovaszHingeLoss(to_onehot_y=True, batch=True),
    ],
)
def test_deep_supervision_loss(weight_mode, weights, expected_weights, make_loss):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()  # interpolate needs float
    outputs = [torch.randn(2, 3, s, s, s, generator=g, requires_grad=True) for s in (8, 4, 2)]
    loss = make_loss()
    ds = DeepSupervisionLoss(loss, weight_mode=weight_mode, weights=weights)
    value = ds(outputs, labels)
    targets = [labels, _nearest_exact_downsample(labels, 2), _nearest_exact_downsample(labels, 4)]
    expected = sum(
        w * loss(o, t) for w, o, t in zip(expected_weights, outputs, targets, strict=True)
    )
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    value.backward()
    for o in outputs:
        assert o.grad is not None and torch.isfinite(o.grad).all()
    # a single tensor goes straight through
    torch.testing.assert_close(ds(outputs[0], labels), loss(outputs[0], labels))


def _parse_loss(config: dict):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=torch.nn.Module)
    cfg = parser.parse_args(["--loss", json.dumps(config)])
    return parser.instantiate_classes(cfg).loss


def test_lightning_cli_style_class_path_init_args():
    loss = _parse_loss(
        {
            "class_path": "lovasz_monai.LovaszCELoss",
            "init_args": {
                "to_onehot_y": True,
                "include_background": False,
                "ignore_index": 255,
                "lambda_lovasz": 2.0,
                "lambda_ce": 0.25,
                "ce_weight": [1.0, 2.0, 3.0],
                "label_smoothing": 0.05,
                "batch": True,
                "classes": "all",
                "method": "histogram",
                "bins": 128,
            },
        }
    )
    assert type(loss) is LovaszCELoss
    assert loss.to_onehot_y and not loss.include_background and loss.batch
    assert loss.ignore_index == 255
    assert loss.lambda_lovasz == 2.0 and loss.lambda_ce == 0.25
    assert loss.label_smoothing == 0.05
    assert loss.classes == "all" and loss.method == "histogram" and loss.bins == 128
    torch.testing.assert_close(loss.ce_weight, torch.tensor([1.0, 2.0, 3.0]))
    assert loss.softmax and not loss.sigmoid
    # the configured object computes the same value as one built in Python
    built = LovaszCELoss(
        to_onehot_y=True,
        include_background=False,
        ignore_index=255,
        lambda_lovasz=2.0,
        lambda_ce=0.25,
        ce_weight=[1.0, 2.0, 3.0],
        label_smoothing=0.05,
        batch=True,
        classes="all",
        method="histogram",
        bins=128,
    )
    logits, labels = _case(4)
    labels[:, :, :2] = 255
    torch.testing.assert_close(loss(logits, labels), built(logits, labels))


@pytest.mark.parametrize(
    ("class_path", "init_args", "expected_type"),
    [
        ("lovasz_monai.LovaszSoftmaxLoss", {"sigmoid": True, "classes": [0, 2]}, LovaszSoftmaxLoss),
        ("lovasz_monai.LovaszHingeLoss", {"reduction": "none", "weight": 2.0}, LovaszHingeLoss),
        ("lovasz_monai.losses.LovaszSoftmaxLoss", {"weight": [1.0, 0.5]}, LovaszSoftmaxLoss),
    ],
)
def test_class_path_variants(class_path, init_args, expected_type):
    loss = _parse_loss({"class_path": class_path, "init_args": init_args})
    assert type(loss) is expected_type
    for key, value in init_args.items():
        if key == "weight":
            torch.testing.assert_close(loss.class_weight, torch.as_tensor(value))
        else:
            assert getattr(loss, key) == value


def test_class_path_invalid_arguments_are_rejected():
    with pytest.raises(Exception, match="lambda|negative|>= 0"):
        _parse_loss({"class_path": "lovasz_monai.LovaszCELoss", "init_args": {"lambda_ce": -1}})


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: LovaszSoftmaxLoss(to_onehot_y=True, weight=[1.0, 2.0, 3.0], ignore_index=255),
        lambda: LovaszSoftmaxLoss(other_act=torch.sigmoid, to_onehot_y=True),
        lambda: LovaszHingeLoss(to_onehot_y=True, method="histogram", bins=64),
        lambda: LovaszCELoss(to_onehot_y=True, ce_weight=[1.0, 1.0, 2.0], label_smoothing=0.1),
    ],
)
def test_pickle_deepcopy_and_state_dict(make_loss):
    # DDP spawn, checkpoints and Lightning's hparams copy the loss
    loss = make_loss()
    logits, labels = _case(5)
    expected = loss(logits, labels)
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        torch.testing.assert_close(clone(logits, labels), expected)
    fresh = make_loss()
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh(logits, labels), expected)
