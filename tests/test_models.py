"""The backbone factory: timm by name, local weights only, grey or RGB input, backbone-driven preprocessing."""

from __future__ import annotations

import pytest
import torch

from medgcsam.models import create_model, input_spec


def test_local_weights_load_into_a_grey_two_class_model(tmp_path):
    """An ImageNet-shaped weights file (3 channels, 1000 classes) feeds a 1-channel, 2-class model: the stem is
    summed over RGB, the head is fresh, everything else is copied."""
    torch.manual_seed(0)
    source = create_model("test_resnet", 1000)
    weights = tmp_path / "imagenet_like.pth"
    torch.save(source.state_dict(), weights)

    model = create_model("test_resnet", 2, in_chans=1, pretrained_path=weights)
    stem = next(n for n, p in source.named_parameters() if p.ndim == 4)
    src, dst = dict(source.named_parameters()), dict(model.named_parameters())
    assert dst[stem].shape[1] == 1
    assert torch.allclose(dst[stem][:, 0], src[stem].sum(dim=1))
    assert model.get_classifier().out_features == 2
    copied = [n for n, p in dst.items() if p.shape == src[n].shape and n != stem and "fc" not in n]
    assert copied and all(torch.equal(dst[n], src[n]) for n in copied)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_bad_names_and_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet_typo'"):
        create_model("resnet_typo", 2)
    with pytest.raises(FileNotFoundError, match="model.pretrained_path"):
        create_model("test_resnet", 2, pretrained_path=tmp_path / "missing.pth")


def test_input_spec_follows_the_backbone_and_grey_input():
    spec = input_spec(create_model("test_resnet", 2), image_size=48, channels=1)
    assert spec.image_size == 48 and spec.channels == 1 and len(spec.mean) == 1 and len(spec.std) == 1
    rgb = input_spec(create_model("test_resnet", 2))
    assert rgb.channels == 3 and len(rgb.mean) == 3 and rgb.image_size > 0
