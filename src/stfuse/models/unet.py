"""A small U-Net: ``depth`` times (two 3x3 conv + norm + ReLU, then 2x2 max-pool) down, the same
back up with 2x2 transposed convolutions and skip connections, and a 1x1 convolution to the
output bands.

Parameters: ``base_channels`` (16; doubled at every level), ``depth`` (2; tile sizes must be
multiples of ``2 ** depth``) and ``norm`` (``"batch"``, default, or ``"group"``).

BatchNorm is the default: in evaluation mode it is a fixed per-channel affine map, so a
prediction does not depend on the other pixels of the tile or on the batch it is in, and
overlapping tiles agree where they overlap (up to the zero padding at tile borders).
GroupNorm normalises over each tile, which makes results depend on the tile's content.
"""

from __future__ import annotations

from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch import nn

from stfuse.models import register

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels), channels)


class _Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16,
                 depth: int = 2, norm: str = "batch"):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("base_channels", base_channels, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"unet: {name} must be an integer >= {low}, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"unet: norm must be one of {NORMS}, got {norm!r}")
        self.depth = depth
        self.size_multiple = 2 ** depth
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(_Block(c, w, norm))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = _Block(c, widths[-1], norm)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.merge.append(_Block(2 * w, w, norm))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"unet (depth {self.depth}): tile size {h} x {w} is not a multiple "
                             f"of {m}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


@register("unet")
def build(in_channels: int, out_channels: int, *, base_channels: int = 16, depth: int = 2,
          norm: str = "batch") -> UNet:
    return UNet(in_channels, out_channels, base_channels=base_channels, depth=depth, norm=norm)
