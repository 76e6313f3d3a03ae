"""Deep supervision in LovaszSegmentationModule: DynUNet's stacked heads and multi-scale lists."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet
from torch import nn

from lovasz_monai.deep_supervision import (
    deep_supervision_loss,
    head_weights,
    resize_nearest,
    split_heads,
)
from lovasz_monai.losses import LovaszCELoss
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.objective import call_loss

S = (16, 16, 16)


def batch(num_classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, *S)
    mask[:, :, :5] = 0  # an ignored slab
    mask[1, :, :, 9:, 3:7] = 0  # and an odd-shaped hole
    return {
        "image": torch.randn(2, 1, *S, generator=g),
        "label": torch.randint(0, num_classes, (2, 1, *S), generator=g).float(),
        "mask": mask,
    }


def dynunet(num_classes: int = 3, deep_supr_num: int = 2) -> DynUNet:
    torch.manual_seed(0)
    return DynUNet(
        3,
        1,
        num_classes,
        kernel_size=[3, 3, 3, 3],
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=[4, 8, 16, 16],
        deep_supervision=True,
        deep_supr_num=deep_supr_num,
    )


class MultiScaleNet(nn.Module):
    """Returns ``[full, 1/2, 1/4]`` resolution logits, each from its own 1x1 conv."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(1, num_classes, 1) for _ in range(3))

    def forward(self, x):
        outs = [conv(nn.functional.avg_pool3d(x, 2**i)) for i, conv in enumerate(self.convs)]
        return outs if self.training else outs[0]


def strided(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Hand-written nearest-neighbour downsampling by an integer factor: the voxel at the centre
    of each block (index ``factor * i + factor // 2``), what ``nearest-exact`` picks."""
    if factor == 1:
        return x
    o = factor // 2
    return x[..., o::factor, o::factor, o::factor]


@pytest.mark.parametrize(("mode", "expected"), [("exp", [1.0, 0.5, 0.25]), ("same", [1.0] * 3)])
def test_dynunet_loss_is_the_weighted_sum_of_the_head_losses(mode, expected):
    data = batch()
    net = dynunet()
    model = LovaszSegmentationModule(
        num_classes=3, network=net, roi_size=S, deep_supervision_weight_mode=mode
    )
    model.train()
    loss = model.training_step(data, 0)

    stacked = net(data["image"])
    assert stacked.shape == (2, 3, 3, *S)  # (B, heads, C, *S): DynUNet upsamples its heads
    fn = LovaszCELoss(to_onehot_y=True, lambda_ce=0.3)
    by_hand = sum(
        w * fn(stacked[:, i], data["label"], mask=data["mask"]) for i, w in enumerate(expected)
    )
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    single = fn(stacked[:, 0], data["label"], mask=data["mask"])
    assert not torch.isclose(loss, single)  # the lower heads do count


def test_explicit_weights_and_modes_match_monai():
    assert head_weights(3, "two") == [1.0, 0.5, 0.5]
    assert head_weights(6, "exp") == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert head_weights(3, "exp", weights=[1.0, 0.2, 0.1]) == [1.0, 0.2, 0.1]
    with pytest.raises(ValueError, match="weight_mode"):
        head_weights(2, "linear")
    with pytest.raises(ValueError, match="weight_mode"):
        LovaszSegmentationModule(num_classes=3, deep_supervision_weight_mode="linear")


def test_multiscale_list_uses_labels_and_masks_resized_by_nearest_neighbour():
    data = batch(seed=1)
    net = MultiScaleNet()
    model = LovaszSegmentationModule(
        num_classes=3, network=net, roi_size=S, deep_supervision_weights=[1.0, 0.3, 0.2]
    )
    model.train()
    loss = model.training_step(data, 0)
    fn = LovaszCELoss(to_onehot_y=True, lambda_ce=0.3)
    heads = net(data["image"])
    by_hand = sum(
        w * fn(head, strided(data["label"], 2**i), mask=strided(data["mask"], 2**i))
        for i, (head, w) in enumerate(zip(heads, [1.0, 0.3, 0.2], strict=True))
    )
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("network", ["dynunet", "list"])
def test_ignored_voxels_get_zero_gradient_in_every_head(network):
    data = batch(seed=2)
    net = dynunet() if network == "dynunet" else MultiScaleNet()
    heads = split_heads(net(data["image"]), spatial_dims=3)
    for head in heads:
        head.retain_grad()
    fn = LovaszCELoss(to_onehot_y=True, lambda_ce=0.3)
    loss = deep_supervision_loss(
        heads,
        data["label"],
        data["mask"],
        lambda x, y, m: call_loss(fn, x, y, m),
        head_weights(len(heads)),
    )
    loss.backward()
    assert len(heads) == 3
    for i, head in enumerate(heads):
        factor = S[0] // head.shape[-1]
        ignored = (strided(data["mask"], factor) == 0).expand_as(head)
        assert ignored.any() and (~ignored).any()
        assert torch.count_nonzero(head.grad[ignored]) == 0, f"head {i}"
        assert torch.count_nonzero(head.grad[~ignored]) > 0.9 * (~ignored).sum(), f"head {i}"


def test_validation_and_prediction_use_the_full_resolution_head():
    data = batch()
    net = dynunet()
    model = LovaszSegmentationModule(num_classes=3, network=net, roi_size=S).eval()
    with torch.no_grad():
        logits = model.sliding_window(data["image"])
        full = model(data["image"])
        net.train()
        first = net(data["image"])[:, 0]
    assert logits.shape == (2, 3, *S)
    torch.testing.assert_close(full, net.eval()(data["image"]))
    # in eval mode DynUNet returns its full-resolution head; instance norm makes it
    # independent of the mode, so it equals head 0 of the training output
    torch.testing.assert_close(full, first, rtol=1e-5, atol=1e-5)
    assert model.predict_step({"image": data["image"]}, 0).shape == (2, 1, *S)
    # a list-returning network in eval mode: its first element
    multi = LovaszSegmentationModule(num_classes=3, network=MultiScaleNet(), roi_size=S)
    multi.network.train()
    with torch.no_grad():
        assert multi(data["image"]).shape == (2, 3, *S)


def test_split_heads_shapes_and_errors():
    x = torch.zeros(2, 3, 8, 8, 8)
    assert split_heads(x, 3)[0] is x
    assert len(split_heads([x, x[..., :4, :4, :4]], 3)) == 2
    with pytest.raises(TypeError, match="list/tuple"):
        split_heads({"out": x}, 3)
    with pytest.raises(TypeError):
        split_heads([], 3)
    with pytest.raises(ValueError, match="head 1"):
        split_heads([x, torch.zeros(2, 3, 8, 8)], 3)
    with pytest.raises(ValueError, match="one weight per head"):
        deep_supervision_loss([x, x], x[:, :1], x[:, :1], lambda *a: a[0].sum(), [1.0])


def test_resize_nearest_keeps_dtype_and_matches_strided_sampling():
    label = torch.randint(0, 5, (1, 1, 8, 8, 8))
    small = resize_nearest(label, (4, 4, 4))
    assert small.dtype == label.dtype
    torch.testing.assert_close(small, strided(label, 2))
    assert resize_nearest(label, (8, 8, 8)) is label


def test_network_output_channels_are_checked_in_every_head():
    class BadHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return [y, y[:, :2, ::2, ::2, ::2]]

    model = LovaszSegmentationModule(num_classes=3, network=BadHead(), roi_size=S)
    with pytest.raises(ValueError, match="returned 2 channels"):
        model.training_step(batch(), 0)


def test_too_few_explicit_weights_and_a_coarse_first_head_raise():
    model = LovaszSegmentationModule(
        num_classes=3, network=MultiScaleNet(), roi_size=S, deep_supervision_weights=[1.0, 0.5]
    )
    with pytest.raises(ValueError, match="cover 2 heads, the network returned 3"):
        model.training_step(batch(), 0)

    class CoarseFirst(MultiScaleNet):
        def forward(self, x):
            return super().forward(x)[::-1]

    model = LovaszSegmentationModule(num_classes=3, network=CoarseFirst(), roi_size=S)
    with pytest.raises(ValueError, match="full resolution first"):
        model.training_step(batch(), 0)


def test_deep_supervision_with_the_ce_to_lovasz_schedule():
    """In the ramp (w = 0.5) every head gets w * Lovász + (1 - w) * CE, CE on valid voxels."""
    data = batch(seed=3)
    net = MultiScaleNet()
    model = LovaszSegmentationModule(
        num_classes=3,
        network=net,
        roi_size=S,
        warmup_loss=nn.CrossEntropyLoss(),
        warmup_epochs=1,
        ramp_epochs=1,
    )
    model.train()
    assert model.lovasz_weight(1) == 0.5
    model.objective.weight = lambda epoch: 0.5  # the epoch in the ramp, without a Trainer
    loss = model.training_step(data, 0)
    lovasz, ce = LovaszCELoss(to_onehot_y=True, lambda_ce=0.3), nn.CrossEntropyLoss()
    total = 0.0
    for i, (head, w) in enumerate(zip(net(data["image"]), [1.0, 0.5, 0.25], strict=True)):
        label, mask = strided(data["label"], 2**i), strided(data["mask"], 2**i)
        target = label[:, 0].long().masked_fill(mask[:, 0] == 0, -100)
        total = total + w * (0.5 * lovasz(head, label, mask=mask) + 0.5 * ce(head, target))
    torch.testing.assert_close(loss, total, rtol=1e-6, atol=1e-6)


def test_multi_label_regions_are_resized_per_channel():
    """Multi-label (B, R, *S) regions with a list of heads: each region channel resized alike."""
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, 1, *S, generator=g)
    regions = (torch.rand(2, 3, *S, generator=g) > 0.6).float()
    mask = torch.ones(2, 1, *S)
    mask[..., :3] = 0
    net = MultiScaleNet()
    model = LovaszSegmentationModule(num_classes=3, network=net, roi_size=S, multi_label=True)
    model.train()
    loss = model.training_step({"image": image, "label": regions, "mask": mask}, 0)
    fn = LovaszCELoss(sigmoid=True)
    by_hand = sum(
        w * fn(head, strided(regions, 2**i), mask=strided(mask, 2**i))
        for i, (head, w) in enumerate(zip(net(image), [1.0, 0.5, 0.25], strict=True))
    )
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
