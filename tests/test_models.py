import os

import pytest
import torch
from torchvision.models import VGG, ResNet
from torchvision.models.resnet import BasicBlock
from torchvision.transforms import Normalize

from srd_ext.data import SHAPES_CLASSES, generate
from srd_ext.models import (
    IMAGENET_MODELS,
    SHAPES_MODELS,
    WEIGHTS_DIR,
    class_names,
    load_model,
    model_input_size,
    model_transform,
    shapes_resnet,
    shapes_vgg,
)


@pytest.fixture(scope="module")
def test_images():
    x, _, y = generate("test", 300)
    return x, y


def test_architectures_are_torchvision_classes():
    vgg = shapes_vgg()
    assert isinstance(vgg, VGG) and isinstance(vgg.avgpool, torch.nn.AdaptiveAvgPool2d)
    res = shapes_resnet()
    assert isinstance(res, ResNet) and isinstance(res.layer1[0], BasicBlock)
    for m in (vgg, res):
        assert not any(p.is_meta for p in m.parameters())
        assert sum(p.numel() for p in m.parameters()) < 1.25e6  # < 5 MB of float32
        assert m(torch.zeros(2, 3, 112, 112)).shape == (2, 10)


@pytest.mark.parametrize("name", SHAPES_MODELS)
def test_shipped_weights(name, test_images):
    path = WEIGHTS_DIR / f"{name}.pt"
    assert path.is_file() and path.stat().st_size < 5e6
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    model = load_model(name)
    assert not model.training
    x, y = test_images
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95, f"{name}: {acc:.3f}"


def test_load_model_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model("shapes-vgg", weights=missing)
    with pytest.raises(FileNotFoundError, match="resnet18"):
        load_model("resnet18", weights=missing)
    with pytest.raises(ValueError, match="needs weights"):
        load_model("vgg16")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("alexnet")


def test_load_model_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(RuntimeError, match="cannot read weights file"):
        load_model("shapes-resnet", weights=bad)
    not_sd = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(RuntimeError, match="does not hold a state_dict"):
        load_model("shapes-resnet", weights=not_sd)


def test_load_model_mismatched_state_dict(tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save(shapes_resnet().state_dict(), other)
    with pytest.raises(RuntimeError, match="missing keys.*unexpected keys"):
        load_model("shapes-vgg", weights=other)
    wrong_classes = tmp_path / "vgg5.pt"
    torch.save(shapes_vgg(num_classes=5).state_dict(), wrong_classes)
    expected = r"shape mismatches.*classifier\.3\.weight \(5, 128\) vs \(10, 128\)"
    with pytest.raises(RuntimeError, match=expected):
        load_model("shapes-vgg", weights=wrong_classes)
    with pytest.raises(RuntimeError, match="does not fit 'resnet18'"):
        load_model("resnet18", weights=other)


def test_load_torchvision_architecture(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pt"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)  # DataParallel-style keys
    model = load_model("resnet18", weights=path)
    assert isinstance(model, ResNet) and not model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_transforms_and_names():
    for name in SHAPES_MODELS + ("resnet50", "vgg16_bn"):
        t = model_transform(name)
        assert isinstance(t, Normalize)
    assert model_input_size("shapes-vgg") == 112 and model_input_size("vgg16") == 224
    assert class_names("shapes-resnet") == SHAPES_CLASSES
    assert len(class_names("resnet18")) == 1000
    assert set(IMAGENET_MODELS) >= {"resnet152", "vgg19_bn"}
