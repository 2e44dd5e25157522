"""Small torchvision models with random weights (random biases and BN statistics too)."""
import torch
import torch.nn as nn
from torchvision.models import ResNet, VGG
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import make_layers


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def tiny_vgg(seed: int = 0, num_classes: int = 5, cfg=(4, "M", 8, "M", 8, 8)) -> VGG:
    """torchvision VGG: convs with bias, in-place ReLUs, max-pools, the classifier head."""
    model = VGG(make_layers(list(cfg)), num_classes=num_classes, init_weights=False)
    width = [c for c in cfg if c != "M"][-1]
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(width, 8), nn.ReLU(True), nn.Dropout(), nn.Linear(8, num_classes))
    return _randomize(model, seed)


def tiny_resnet(block=BasicBlock, seed: int = 0, widths=(4, 8, 8, 8), layers=(1, 1, 1, 1),
                num_classes: int = 5) -> ResNet:
    """torchvision ResNet (reused ReLU module, functional +, BN, downsample), narrowed."""
    model = ResNet(block, [1, 1, 1, 1], num_classes=num_classes)
    model.inplanes = widths[0]
    model.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.layer1 = model._make_layer(block, widths[0], layers[0])
    model.layer2 = model._make_layer(block, widths[1], layers[1], stride=2)
    model.layer3 = model._make_layer(block, widths[2], layers[2], stride=2)
    model.layer4 = model._make_layer(block, widths[3], layers[3], stride=2)
    model.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    return _randomize(model, seed)
