"""``tattn``: temporal self-attention over the dates around the target, SAR series included.

The U-Net sees the 2K + 1 dates stacked as channels and one paired SAR date. This model treats
every date as a token instead (after U-TILISE and TAMRFSITS, sized to train on a CPU at demo
scale), so it can weigh the dates per pixel -- a clear date 40 days away against a cloudy one
nearby -- and compare the SAR of the target date with the SAR of the dates it copies from:

1. **tokens**: for the target date t and each of its 2K neighbours, per pixel, the optical bands
   (0 where not clear), the clear flag, the SAR bands paired with *that* date and their presence,
   the day of year (sin, cos), the day offset to t, the presence of the date and a target flag.
   The input layout is the assembler's ``"sequence"`` one (:mod:`stfuse.dataset`, item 6);
   ``tokens`` says which input channel is which;
2. a **spatial encoder** shared by all dates: 3x3 convolution, then a stride-2 3x3 convolution to
   half resolution (4x fewer attention sequences);
3. a **temporal encoding** of each token's day offset (Fourier features of a few periods from a
   week to a year, mapped linearly) added to it;
4. ``layers`` pre-norm transformer blocks of **self-attention across the dates** of each
   half-resolution pixel; dates beyond the ends of the series are masked out of the keys;
5. the **target token** read out, upsampled, joined with the full-resolution features of the
   target date and the per-pixel context (static layers, the temporal prior), and a small
   convolutional decoder to the outputs.

Every normalisation is per pixel (BatchNorm, fixed in evaluation, and LayerNorm over features),
so, as for the U-Net, a prediction does not depend on the other pixels of its tile beyond the
convolutions' reach or on the batch it is in. Training wraps it in
:class:`stfuse.models.ResidualOnPrior` like any model when the prior is there: the decoder's last
convolution is the output layer zeroed at the start.

Parameters: ``width`` (32, the token features), ``heads`` (4; divides ``width``), ``layers`` (2).
Tile sizes must be even.
"""

from __future__ import annotations

import math

from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch import nn

from stfuse.models import register

#: periods (days) of the Fourier features of a token's day offset
PERIODS_DAYS = (8.0, 16.0, 32.0, 64.0, 128.0, 365.25)
#: the assembler's dt channels are in units of this many days (stfuse.dataset.DT_SCALE_DAYS)
DT_UNIT_DAYS = 30.0


def _positive_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"tattn: {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_tokens(tokens, in_channels: int) -> tuple[list[dict], list[int], int, int]:
    if not isinstance(tokens, dict) or not isinstance(tokens.get("tokens"), list) \
            or not tokens["tokens"]:
        raise ValueError("tattn: needs tokens= (stfuse.dataset.InputAssembler.token_layout()), "
                         f"got {tokens!r}")
    toks, n_bands, n_sar = tokens["tokens"], int(tokens["n_bands"]), int(tokens["n_sar"])
    for i, tok in enumerate(toks):
        idx = list(tok["bands"]) + [tok["valid"], tok["sar_present"], *tok["doy"], *tok["sar"]] \
            + ([tok["dt"], tok["present"]] if i else [])
        if len(tok["bands"]) != n_bands or len(tok["sar"]) != n_sar \
                or any(not 0 <= int(j) < in_channels for j in idx):
            raise ValueError(f"tattn: token {i} ({tok.get('tag')}) does not fit {in_channels} "
                             f"input channels with {n_bands} bands and {n_sar} SAR bands: {tok}")
    context = [int(j) for j in tokens.get("context", [])]
    if any(not 0 <= j < in_channels for j in context):
        raise ValueError(f"tattn: context indices {context} outside {in_channels} input channels")
    return toks, context, n_bands, n_sar


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block over the date axis: x (L, T, C), keys masked where ``absent``.

    Attention is written out (two batched products over T x T scores) rather than
    ``nn.MultiheadAttention``: its fused CPU kernels are built for long sequences and spend most of
    their time in set-up on these many thousands of sequences of ~10 dates (forward and backward of one
    block, 4096 sequences of 9 dates, one thread: 0.63 s against 0.40 s written out, medians of 5).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).unbind(2)
        scores = torch.einsum("nthd,nshd->nhts", q, k) * (c // self.heads) ** -0.5
        scores = scores.masked_fill(absent[:, None, None, :], float("-inf"))
        attn = torch.einsum("nhts,nshd->nthd", scores.softmax(dim=-1), v).reshape(n, t, c)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class TemporalAttentionNet(nn.Module):
    size_multiple = 2

    def __init__(self, in_channels: int, out_channels: int, tokens: dict, width: int = 32,
                 heads: int = 4, layers: int = 2):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        width = _positive_int(width, "width", 4)
        heads = _positive_int(heads, "heads")
        layers = _positive_int(layers, "layers", 0)
        if width % heads:
            raise ValueError(f"tattn: width {width} is not a multiple of heads {heads}")
        toks, context, n_bands, n_sar = _check_tokens(tokens, in_channels)
        self.n_tokens = len(toks)
        zero, one = in_channels, in_channels + 1  # two constant channels appended to the input
        rows = []
        for i, tok in enumerate(toks):
            dt, present = (tok["dt"], tok["present"]) if i else (zero, one)
            rows.append([*tok["bands"], tok["valid"], *tok["sar"], tok["sar_present"], *tok["doy"],
                         dt, present, one if i == 0 else zero])
        self.n_features = len(rows[0])
        self.register_buffer("_gather", torch.tensor(rows, dtype=torch.long).reshape(-1),
                             persistent=False)
        self.register_buffer("_dt_idx", torch.tensor([r[-3] for r in rows], dtype=torch.long),
                             persistent=False)
        self.register_buffer("_present_idx", torch.tensor([r[-2] for r in rows], dtype=torch.long),
                             persistent=False)
        self.register_buffer("_context_idx", torch.tensor(context, dtype=torch.long),
                             persistent=False)
        self.register_buffer("_omega", torch.tensor([2 * math.pi * DT_UNIT_DAYS / p
                                                     for p in PERIODS_DAYS]), persistent=False)

        self.encode_full = nn.Sequential(
            nn.Conv2d(self.n_features, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True))
        self.encode_half = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True))
        self.time = nn.Linear(2 * len(PERIODS_DAYS), width)
        self.blocks = nn.ModuleList(_AttentionBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.decode = nn.Sequential(
            nn.Conv2d(2 * width + len(context), width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(width, out_channels, 1)  # registered last: the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"tattn: tile size {h} x {w} is not a multiple of 2")
        t, f = self.n_tokens, self.n_features
        const = x.new_zeros((n, 2, h, w))
        const[:, 1] = 1.0
        xe = torch.cat([x, const], dim=1)
        feats = xe.index_select(1, self._gather).reshape(n * t, f, h, w)
        full = self.encode_full(feats)                        # (n t, C, h, w)
        half = self.encode_half(full)                         # (n t, C, h/2, w/2)
        c, hh, ww = half.shape[1:]
        # one constant per tile and token: read at the tile's first pixel
        dt = xe[:, self._dt_idx, 0, 0].float()                # (n, t), units of 30 days
        absent = xe[:, self._present_idx, 0, 0] < 0.5         # (n, t); the target never is
        phase = dt[..., None] * self._omega                   # (n, t, P)
        enc = self.time(torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1))  # (n, t, C)
        seq = half.reshape(n, t, c, hh * ww).permute(0, 3, 1, 2) + enc[:, None].to(half.dtype)
        seq = seq.reshape(n * hh * ww, t, c)
        mask = absent[:, None].expand(n, hh * ww, t).reshape(n * hh * ww, t)
        for block in self.blocks:
            seq = block(seq, mask)
        target = self.norm(seq[:, 0]).reshape(n, hh, ww, c).permute(0, 3, 1, 2)
        up = self.up(target.contiguous())
        skip = full.reshape(n, t, c, h, w)[:, 0]
        ctx = x.index_select(1, self._context_idx)
        return self.head(self.decode(torch.cat([up, skip, ctx], dim=1)))


@register("tattn", layout="sequence")
def build(in_channels: int, out_channels: int, *, tokens: dict, width: int = 32, heads: int = 4,
          layers: int = 2) -> TemporalAttentionNet:
    return TemporalAttentionNet(in_channels, out_channels, tokens, width=width, heads=heads,
                                layers=layers)
