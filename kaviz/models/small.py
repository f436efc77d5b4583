"""Small CPU families for 32×32 images: a CIFAR-style ResNet, a VGG-style net, a MobileNetV2-style net.

Three *different* families so that the amalgamation papers' "heterogeneous teachers, student of a
third kind" can be reproduced on a laptop. Every operation is its own named module and no module
is used twice in a forward pass, so any intermediate feature can be tapped by name; no ReLU is
in-place, so a tapped tensor is never modified after it was captured.

Layer names:
- ``cifar_resnet*``: ``conv1 bn1 relu layer1..layer3 avgpool flatten fc``; blocks
  ``layerK.i.{conv1,bn1,relu1,conv2,bn2,shortcut,merge,relu2}`` where ``merge`` is the residual sum
  before the block's last ReLU (the "pre-activation" feature of the consistency paper).
- ``vgg*_small``: ``features.N`` (conv, bn, relu, pool as in torchvision's VGG), ``avgpool flatten fc``.
  ``norm=False`` builds the BN-free variant (conv with bias, relu, pool; the ``features.N`` indices
  shift accordingly), as the AlexNet-style students of layer-wise amalgamation: an auxiliary 1×1
  map on a layer's pre-activation output folds exactly into that layer's conv only without a norm.
- ``mobilenet_small``: ``stem``, ``blocks.N.{expand,dw,project}`` (each conv-bn[-relu6]),
  ``head`` (1×1 conv-bn-relu6), ``avgpool flatten fc``.
"""
from __future__ import annotations

from torch import nn

from . import register


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.merge = nn.Identity()  # the residual sum, before the last ReLU
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.merge(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs (He et al. 2016, CIFAR variant): depth = 6n + 2, widths w, 2w, 4w."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"cifar_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        cin = width
        for i, mult in enumerate((1, 2, 4)):
            cout = width * mult
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        self.out_channels = cin
        self.kaviz_stages = ["layer1", "layer2", "layer3"]
        _init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


for _d in (8, 14, 20, 32):
    register(f"cifar_resnet{_d}", family="cifar_resnet")(
        (lambda d: lambda num_classes, width=16, in_channels=3: CifarResNet(d, width, num_classes, in_channels))(_d)
    )


# -------------------------------------------------------------------------------------------- VGG
_VGG_CFGS = {
    "vgg8_small": (1, "M", 2, "M", 4, 4, "M", 8, 8),
    "vgg11_small": (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8),
}


class SmallVGG(nn.Module):
    """VGG-style plain conv stack (Simonyan & Zisserman 2015) with batch-norm, sized for 32×32.
    ``norm=False``: no batch-norm, convolutions with a bias (zero-initialised) instead."""

    def __init__(self, cfg, width: int = 16, num_classes: int = 10, in_channels: int = 3, norm: bool = True):
        super().__init__()
        if not isinstance(norm, bool):
            raise ValueError(f"norm must be True (conv-bn-relu) or False (conv-relu, BN-free), got {norm!r}")
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = int(v * width)
                if norm:
                    layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                else:
                    layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=True), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        self.out_channels = cin
        # the output of each resolution: every pooling layer, and the last ReLU
        self.kaviz_stages = [f"features.{i}" for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        if not isinstance(layers[-1], nn.MaxPool2d):
            self.kaviz_stages.append(f"features.{len(layers) - 1}")
        _init(self)

    def forward(self, x):
        return self.fc(self.flatten(self.avgpool(self.features(x))))


for _name, _cfg in _VGG_CFGS.items():
    register(_name, family="vgg")(
        (lambda c: lambda num_classes, width=16, in_channels=3, norm=True: SmallVGG(c, width, num_classes, in_channels,
                                                                                     norm))(_cfg)
    )


# -------------------------------------------------------------------------------------- MobileNet
class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBN(cin, hidden, 1)
        self.dw = ConvBN(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBN(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class SmallMobileNet(nn.Module):
    """MobileNetV2-style net (Sandler et al. 2018): inverted residuals with depthwise convs."""

    # (expansion, output width multiple, repeats, first stride)
    SETTING = ((1, 1, 1, 1), (4, 1.5, 2, 2), (4, 2, 2, 2), (4, 4, 2, 2))

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 3, head_width: int | None = None):
        super().__init__()
        self.stem = ConvBN(in_channels, width, 3)
        blocks = []
        cin = width
        for t, mult, reps, s in self.SETTING:
            cout = int(width * mult)
            for r in range(reps):
                blocks.append(InvertedResidual(cin, cout, s if r == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head_width = head_width or cin * 2
        self.head = ConvBN(cin, head_width, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(head_width, num_classes)
        self.out_channels = head_width
        self.kaviz_stages = ["stem"] + [f"blocks.{i}" for i in self._stage_ends()] + ["head"]
        _init(self)

    def _stage_ends(self):
        ends, i = [], -1
        for _t, _m, reps, _s in self.SETTING:
            i += reps
            ends.append(i)
        return ends

    def forward(self, x):
        return self.fc(self.flatten(self.avgpool(self.head(self.blocks(self.stem(x))))))


@register("mobilenet_small", family="mobilenet")
def mobilenet_small(num_classes, width=16, in_channels=3, head_width=None):
    return SmallMobileNet(width, num_classes, in_channels, head_width)
