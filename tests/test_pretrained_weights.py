"""Local ImageNet-style weights as a first-class option (issue 19): a timm ResNet-18 state dict written to disk as
safetensors or as a wrapped torch file loads into a grey or RGB model of another class count, through the
pipeline's ``model.pretrained_path`` as well as the factory."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from medgcsam.config import load_config
from medgcsam.models import create_model


@pytest.fixture(scope="module")
def imagenet_like() -> dict[str, torch.Tensor]:
    """What an ImageNet checkpoint of timm's resnet18 holds: 3-channel stem, 1000-class head (random values)."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    for buf in source.buffers():  # BN running statistics too, so a copied buffer is told from a fresh one
        buf.copy_(torch.rand_like(buf.float()).to(buf.dtype) + 1)
    return {k: v.detach().clone().contiguous() for k, v in source.state_dict().items()}


def _write(kind: str, state: dict[str, torch.Tensor], folder) -> str:
    if kind == "safetensors":
        path = folder / "resnet18.safetensors"
        save_file(state, str(path))
    else:  # a training checkpoint from DDP: wrapped in "state_dict", keys prefixed with "module."
        path = folder / "resnet18.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
    return str(path)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_grey_model_gets_summed_stem_copied_body_and_fresh_head(tmp_path, imagenet_like, kind):
    path = _write(kind, imagenet_like, tmp_path)
    torch.manual_seed(1)
    model = create_model("resnet18", 3, in_chans=1, pretrained_path=path)
    got = model.state_dict()
    # grey input: the RGB kernels summed, so a grey image repeated 3 times gives the same stem output
    assert got["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(got["conv1.weight"][:, 0], imagenet_like["conv1.weight"].sum(1))
    body = [k for k in imagenet_like if not k.startswith(("conv1.", "fc."))]
    assert len(body) > 100
    for k in body:
        assert torch.equal(got[k], imagenet_like[k]), k
    assert got["fc.weight"].shape == (3, 512) and got["fc.bias"].shape == (3,)
    grey = torch.rand(2, 1, 32, 32)
    stem_rgb = torch.nn.functional.conv2d(grey.expand(-1, 3, -1, -1), imagenet_like["conv1.weight"], stride=2,
                                          padding=3)
    torch.testing.assert_close(model.conv1(grey), stem_rgb, rtol=1e-4, atol=1e-4)


def test_rgb_model_and_pipeline_field_load_the_same_file(tmp_path, imagenet_like):
    path = _write("safetensors", imagenet_like, tmp_path)
    rgb = create_model("resnet18", 3, in_chans=3, pretrained_path=path)
    assert torch.equal(rgb.state_dict()["conv1.weight"], imagenet_like["conv1.weight"])

    (tmp_path / "m.csv").write_text("path,label,split,fold\n", encoding="utf-8")
    yaml = tmp_path / "p.yaml"
    yaml.write_text(f"data: {{manifest: m.csv}}\nmodel: {{name: resnet18, pretrained_path: {path}}}\n",
                    encoding="utf-8")
    cfg = load_config(yaml)
    built = create_model(cfg.model.name, 2, in_chans=1, pretrained_path=cfg.model.pretrained_path)
    torch.testing.assert_close(built.state_dict()["conv1.weight"][:, 0], imagenet_like["conv1.weight"].sum(1))


def test_random_init_differs_from_the_weights_file(tmp_path, imagenet_like):
    """The check above could pass if the factory ignored the file and timm happened to init alike; it does not."""
    model = create_model("resnet18", 3, in_chans=3)
    assert not torch.equal(model.state_dict()["layer1.0.conv1.weight"], imagenet_like["layer1.0.conv1.weight"])
