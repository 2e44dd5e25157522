"""Small models with random weights for the tests: biases, norm parameters, gains, layer scales
and BatchNorm statistics randomised too (default inits leave biases at 0 and BatchNorm at the
identity, and on such models no bias rule is exercised)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VGG, ResNet
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import make_layers

from srd_ext import zoo


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights (He-scaled), biases, norm parameters, gains/layer scales and running
    statistics; eval mode."""
    return zoo.randomize(model, seed, weights=True)


_randomize = randomize


def tiny_vgg(seed: int = 0, num_classes: int = 5, cfg=(4, "M", 8, "M", 8, 8)) -> VGG:
    """torchvision VGG: convs with bias, in-place ReLUs, max-pools, the classifier head."""
    model = VGG(make_layers(list(cfg)), num_classes=num_classes, init_weights=False)
    width = [c for c in cfg if c != "M"][-1]
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(width, 8), nn.ReLU(True), nn.Dropout(), nn.Linear(8, num_classes))
    return randomize(model, seed)


def tiny_resnet(
    block=BasicBlock, seed: int = 0, widths=(4, 8, 8, 8), layers=(1, 1, 1, 1), num_classes: int = 5
) -> ResNet:
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
    return randomize(model, seed)


# --------------------------------------------------------------------------------------------
# One small model per op family, each a classifier (B, 3, 16, 16) -> (B, 5)
# --------------------------------------------------------------------------------------------
class _Head(nn.Module):
    def __init__(self, c, k=5):
        super().__init__()
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvVariants(nn.Module):
    """Strides, dilation, groups, depthwise, 'same' padding (asymmetric), 1x1 with stride and
    padding, a conv without bias, BatchNorm folded, a stand-alone BatchNorm after a max-pool."""

    def __init__(self, w=8):
        super().__init__()
        self.c1 = nn.Conv2d(3, w, 3, padding=1)
        self.c2 = nn.Conv2d(w, w, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False)  # depthwise, no bias
        self.b3 = nn.BatchNorm2d(w)
        self.c4 = nn.Conv2d(w, w, 4, padding="same")  # asymmetric 'same'
        self.c5 = nn.Conv2d(w, 2 * w, 1, stride=2, padding=1)  # 1x1, stride, padding
        self.pool = nn.MaxPool2d(3, 1, 1)  # overlapping windows
        self.bn = nn.BatchNorm2d(2 * w)  # stand-alone BN
        self.c6 = nn.Conv2d(2 * w, 2 * w, 1)
        self.head = _Head(2 * w)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.b3(self.c3(x)))
        x = F.elu(self.c4(x))
        x = F.relu(self.c5(x))
        x = F.relu(self.c6(self.bn(self.pool(x))))
        return self.head(x)


class ConcatSplit(nn.Module):
    """DenseNet / Inception / ShuffleNet routing: concat of branches, a BatchNorm after the
    concat, split and chunk, a channel shuffle (view, transpose, reshape), average pools."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.b1 = nn.Conv2d(w, w // 2, 1)
        self.b2 = nn.Conv2d(w, w // 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * w)
        self.c = nn.Conv2d(2 * w, w, 1)
        self.d = nn.Conv2d(w // 2, w // 2, 3, padding=1, groups=w // 2)
        self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.e = nn.Conv2d(w, w, 3, padding=1)
        self.head = _Head(w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([x, F.relu(self.b1(x)), F.relu(self.b2(x))], 1)
        x = F.relu(self.c(F.relu(self.bn(y))))
        a, b = x.chunk(2, 1)
        b = F.relu(self.d(b))
        x = torch.cat([a, b], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        p, q = torch.split(x, [3, c - 3], 1)
        x = torch.cat([q, p], 1)
        x = F.relu(self.e(self.pool(x)))
        return self.head(x)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=2, gate=nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = self.gate(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class Gates(nn.Module):
    """MobileNet/EfficientNet-style blocks: squeeze-excitation (sigmoid, hard sigmoid), a
    spatial attention gate, a Swish written as x * sigmoid(x), layer scale, Hardswish, ReLU6,
    Mish, SiLU, an inverted residual without activation after the add."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(w)
        self.expand = nn.Conv2d(w, 2 * w, 1)
        self.dw = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w)
        self.se = SqueezeExcite(2 * w)
        self.project = nn.Conv2d(2 * w, w, 1)
        self.bnp = nn.BatchNorm2d(w)
        self.se2 = SqueezeExcite(w, gate=nn.Hardsigmoid)
        self.att = nn.Conv2d(w, 1, 3, padding=1)
        self.scale = nn.Parameter(torch.full((w, 1, 1), 0.5))
        self.c2 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(w, w, 3, padding=1)
        self.head = _Head(w)

    def forward(self, x):
        x = F.hardswish(self.bn0(self.stem(x)))
        y = F.relu6(self.expand(x))
        y = F.silu(self.dw(y))
        y = self.se(y)
        y = self.bnp(self.project(y))
        x = x + y * self.scale  # inverted residual, layer scale, no activation
        x = self.se2(x)
        x = x * torch.sigmoid(self.att(x))  # spatial attention gate
        x = self.c2(x)
        x = x * torch.sigmoid(x)  # Swish written out
        x = F.mish(self.c3(x))
        return self.head(x)


class ChannelsLast(nn.Module):
    """ConvNeXt-style blocks: depthwise conv, permute to channels-last, LayerNorm and Linear over
    channels, GELU, layer scale, residual stream with no activation (the encoder output is the
    last stream value); GroupNorm; an input transform (per-channel affine) before the stem."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 2, stride=2)
        self.dw = nn.Conv2d(w, w, 5, padding=2, groups=w)
        self.ln = nn.LayerNorm(w, eps=1e-6)
        self.fc1 = nn.Linear(w, 2 * w)
        self.fc2 = nn.Linear(2 * w, w)
        self.gamma = nn.Parameter(torch.full((w,), 0.7))
        self.gn = nn.GroupNorm(2, w)
        self.c = nn.Conv2d(w, w, 3, padding=1)
        self.head = _Head(w)

    def forward(self, x):
        x = torch.cat([x[:, :1] * 0.9 + 0.1, x[:, 1:2] * 1.1 - 0.2, x[:, 2:] * 0.8 + 0.05], 1)
        x = self.stem(x)
        for _ in range(2):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.fc2(F.gelu(self.fc1(self.ln(y))))
            x = x + (self.gamma * y).permute(0, 3, 1, 2)
        x = x + self.c(self.gn(x))
        return self.head(x)


class Resizing(nn.Module):
    """HRNet/DLA-style routing: nearest and bilinear upsampling, adaptive average pooling to a
    grid, zero / reflect padding, a TF-style -inf padded max-pool, LeakyReLU, PReLU, Tanh,
    Softplus, Hardtanh, GELU (tanh)."""

    def __init__(self, w=6):
        super().__init__()
        self.c1 = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(w, w, 3)
        self.prelu = nn.PReLU(w)
        self.c4 = nn.Conv2d(w, w, 1)
        self.c5 = nn.Conv2d(w, w, 3, padding=1)
        self.head = _Head(w)

    def forward(self, x):
        a = F.leaky_relu(self.c1(x), 0.1)  # 8x8
        b = torch.tanh(self.c2(a))  # 4x4
        u = F.interpolate(b, scale_factor=2, mode="nearest") + F.interpolate(b, size=(8, 8), mode="bilinear")
        x = self.prelu(self.c3(F.pad(a + u, (1, 1, 1, 1), mode="reflect")))
        x = F.softplus(self.c4(F.adaptive_avg_pool2d(x, (4, 4))), beta=2)
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)
        x = F.hardtanh(self.c5(F.pad(x, (1, 1, 1, 1))), -0.5, 1.5)
        x = F.gelu(x, approximate="tanh")
        return self.head(x)


class Misc(nn.Module):
    """The remaining rules: selective-kernel style stack + softmax gate + sum, ConvNeXt V2's
    global response norm (addcmul), rsub, narrow, select + unsqueeze, an expanded gate, unbind,
    tensor_split, movedim, unflatten, a non-global adaptive max-pool, clamp, SELU, CELU."""

    def __init__(self, w=6):
        super().__init__()
        self.c1 = nn.Conv2d(3, w, 3, padding=1)
        self.k3 = nn.Conv2d(w, w, 3, padding=1)
        self.k5 = nn.Conv2d(w, w, 5, padding=2)
        self.fc = nn.Conv2d(w, 2 * w, 1)
        self.grn_gamma = nn.Parameter(torch.full((1, 1, 1, w), 0.3))
        self.grn_beta = nn.Parameter(torch.full((1, 1, 1, w), 0.1))
        self.c2 = nn.Conv2d(w, w, 3, padding=1)
        self.c3 = nn.Conv2d(w + 1, w, 1)
        self.head = _Head(w)

    def forward(self, x):
        x = F.selu(self.c1(x))
        b = torch.stack([F.relu(self.k3(x)), F.relu(self.k5(x))], 1)  # (B, 2, C, H, W)
        a = self.fc(b.sum(1).mean((2, 3), keepdim=True))  # (B, 2C, 1, 1)
        a = a.unflatten(1, (2, -1)).softmax(1)  # (B, 2, C, 1, 1)
        x = (b * a).sum(1)
        y = x.movedim(1, -1)  # GRN, channels-last
        gx = torch.linalg.vector_norm(y, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
        y = y + torch.addcmul(self.grn_beta, self.grn_gamma, y * nx)
        x = F.celu(y.movedim(-1, 1), 0.7)
        p, q, r = torch.tensor_split(x, 3, 1)
        u0, u1 = torch.unbind(torch.stack([p, q], 2), 2)
        z = torch.cat([u0, 1.5 - u1, r.narrow(1, 0, 2), x.select(1, 0).unsqueeze(1)], 1)
        z = F.adaptive_max_pool2d(z, (6, 6))
        g = torch.sigmoid(self.c2(x)).mean(1, keepdim=True)
        z = z * F.adaptive_avg_pool2d(g, (6, 6)).expand_as(z)  # an expanded gate
        z = self.c3(z).clamp(-0.2, 0.9)
        return self.head(F.relu(z))


class Products(nn.Module):
    """Products of two input-dependent maps: StarNet's ``act(f1 x) * f2 x``, a gated MLP over
    channels-last tokens (MambaOut-style: ``(fc1 x) * act(fc2 x)``), and a square ``x * x``."""

    def __init__(self, w=6):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.f1 = nn.Conv2d(w, 2 * w, 1)
        self.f2 = nn.Conv2d(w, 2 * w, 1)
        self.g = nn.Conv2d(2 * w, w, 3, padding=1)
        self.fc1 = nn.Linear(w, w)
        self.fc2 = nn.Linear(w, w)
        self.head = _Head(w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.g(F.relu6(self.f1(x)) * self.f2(x))  # a star block
        t = x.permute(0, 2, 3, 1)
        t = t + self.fc1(t) * F.gelu(self.fc2(t))  # a gated MLP
        x = t.permute(0, 3, 1, 2)
        return self.head(F.relu(x * x) + x)


def op_models():
    """name -> (model builder, input size) for the per-op reference tests."""
    return {
        "products": (lambda: randomize(Products(), 17), 10),
        "conv-variants": (lambda: randomize(ConvVariants(), 11), 16),
        "concat-split": (lambda: randomize(ConcatSplit(), 12), 12),
        "gates": (lambda: randomize(Gates(), 13), 12),
        "channels-last": (lambda: randomize(ChannelsLast(), 14), 12),
        "resizing": (lambda: randomize(Resizing(), 15), 16),
        "misc": (lambda: randomize(Misc(), 16), 12),
    }
