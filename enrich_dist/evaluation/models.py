"""The evaluation's networks, written in plain torch: a ResNet-18-style classifier, a small CNN, a
logistic-regression probe and a small U-Net. All take (B, 1, S, S) grayscale input."""

from __future__ import annotations

import torch
from torch import nn


class LinearProbe(nn.Module):
    """Multinomial logistic regression on the flattened pixels."""

    def __init__(self, image_size: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(image_size * image_size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _conv_bn(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks and global average pooling: the fast CPU classifier."""

    def __init__(self, n_classes: int, width: int = 8):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        blocks = [
            nn.Sequential(_conv_bn(a, b), nn.MaxPool2d(2)) for a, b in zip(chans[:-1], chans[1:], strict=True)
        ]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """The ResNet-18 residual block: two 3x3 convs, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al.; torchvision's layout: 7x7 stem, 4 stages of 2 blocks) for 1-channel input.

    ``width`` is the first stage's channels (64 in ResNet-18); smaller widths keep CPU tests fast.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


class UNet(nn.Module):
    """A U-Net (Ronneberger et al.) with ``depth`` down/up levels and ``width`` channels at the top.

    Input sides must be divisible by 2**depth; the output has ``n_classes`` logits per pixel.
    """

    def __init__(self, n_classes: int, width: int = 16, depth: int = 3):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = 1
        for c in chans[:-1]:
            self.down.append(nn.Sequential(_conv_bn(c_in, c), _conv_bn(c, c)))
            c_in = c
        self.bottom = nn.Sequential(_conv_bn(chans[-2], chans[-1]), _conv_bn(chans[-1], chans[-1]))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c_deep, c in zip(reversed(chans[1:]), reversed(chans[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(c_deep, c, 2, stride=2))
            self.merge.append(nn.Sequential(_conv_bn(2 * c, c), _conv_bn(c, c)))
        self.out = nn.Conv2d(chans[0], n_classes, 1)
        self.multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(
                f"U-Net input sides must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.out(x)


CLASSIFIERS = ("linear", "cnn", "resnet")
SEGMENTERS = ("unet",)
DEFAULT_SIZES = {"linear": 32, "cnn": 32, "resnet": 80, "unet": 64}


def build_model(name: str, n_classes: int, image_size: int, width: int | None = None) -> nn.Module:
    """The network called ``name`` (``linear``, ``cnn``, ``resnet`` or ``unet``)."""
    if name == "linear":
        return LinearProbe(image_size, n_classes)
    if name == "cnn":
        return SmallCNN(n_classes, width or 8)
    if name == "resnet":
        return ResNet18(n_classes, width or 64)
    if name == "unet":
        return UNet(n_classes, width or 16)
    raise ValueError(f"unknown model {name!r}; classification: {CLASSIFIERS}, segmentation: {SEGMENTERS}")
