"""ToyCNN: the small classifier of the toy default, split at `block4` (8 x 8 x 128, ReLU, so >= 0).

Input: 64 x 64 images already normalized ((x - 0.5) / 0.25, done outside the model by the loader).
Children in order: block1..block4, pool (global average), flatten, fc, so that h = fc(mean(A)).
"""

from __future__ import annotations

from torch import nn

WIDTHS = (24, 48, 96, 128)


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class ToyCNN(nn.Sequential):
    """Four conv/BN/ReLU blocks (64 -> 32 -> 16 -> 8 -> 8 px), global average pooling, a linear
    head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = WIDTHS):
        w1, w2, w3, w4 = widths
        super().__init__()
        self.block1 = nn.Sequential(*_conv(3, w1, stride=2))
        self.block2 = nn.Sequential(*_conv(w1, w2, stride=2), *_conv(w2, w2))
        self.block3 = nn.Sequential(*_conv(w2, w3, stride=2), *_conv(w3, w3))
        self.block4 = nn.Sequential(*_conv(w3, w4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w4, num_classes)
