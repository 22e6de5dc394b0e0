"""``tattn``: temporal attention over the dates around the target, SAR series included.

The U-Net sees the 2K + 1 dates stacked as channels and one paired SAR date. This model treats
every date as a token instead (after U-TILISE and TAMRFSITS), so it can weigh the dates -- a clear
date 40 days away against a cloudy one nearby -- and compare the SAR of the target date with the
SAR of the dates it copies from. It is shaped to train on two CPU cores in about twice the U-Net's
time per epoch (figures in the README):

1. **tokens**: for the target date t and each of its 2K neighbours, per pixel, the optical bands
   (0 where not clear), the clear flag, the SAR bands paired with *that* date and their presence,
   the day of year (sin, cos), the day offset to t, the presence of the date and a target flag.
   The input layout is the assembler's ``"sequence"`` one (:mod:`stfuse.dataset`, item 6);
   ``tokens`` says which input channel is which;
2. a **patch encoder** shared by all dates: a ``patch`` x ``patch`` convolution with that stride
   (a ViT patch embedding) and a 1x1 convolution, so attention runs on ``patch``^2 times fewer
   cells; the target date alone also gets a full-resolution 3x3 encoder;
3. a **temporal encoding** of each token's day offset (Fourier features of a few periods from a
   week to a year, mapped linearly) added to it;
4. ``layers`` pre-norm blocks of **cross-attention: the target token queries all the dates** of
   its patch (itself included; dates beyond the ends of the series are masked out of the keys).
   One query per patch instead of 2K + 1 (self-attention) cuts the cost again after the patches
   (a training step of 16 demo tiles, K = 4, before the pooling was added: 0.080 s with
   self-attention, 0.051 s with the query; the first version of this model, self-attention at half
   resolution, took 0.229 s);
5. **per-pixel pooling** (the attention-mask upsampling of U-TAE, Garnot & Landrieu 2021): the
   last block's attention scores, one set per head, are spread to the patch's pixels and
   renormalised over the dates that are *clear at each pixel*; each head then averages the bands
   of those dates -- a learned temporal interpolation per head that respects the cloud mask pixel
   by pixel, which the patch-level attention alone cannot;
6. the target token read out, upsampled (transposed convolution) and joined with the target date's
   full-resolution features, the pooled bands and the per-pixel context (static layers, the
   temporal prior); a small convolutional decoder to the outputs.

Every normalisation is per pixel or per patch (BatchNorm, fixed in evaluation, and LayerNorm over
features), so, as for the U-Net, a prediction does not depend on the other tiles of its batch.
Training wraps it in :class:`stfuse.models.ResidualOnPrior` like any model when the prior is
there: the decoder's last convolution is the output layer zeroed at the start.

Parameters: ``width`` (32, the token features), ``heads`` (4; divides ``width``), ``layers`` (2),
``patch`` (4, cells per patch side). Tile sizes must be multiples of ``patch``.
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


class _CrossAttentionBlock(nn.Module):
    """Pre-norm block: the query q (L, C) attends over the tokens (L, T, C), keys masked where ``absent``.

    Returns the updated query and the attention scores (L, heads, T) before the softmax. Attention
    is written out (two batched products) rather than ``nn.MultiheadAttention``, whose fused CPU
    kernels are built for long sequences and spend most of their time in set-up on these many
    thousands of sequences of ~10 dates (1.6x slower, measured on the former self-attention model).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, absent: torch.Tensor):
        n, t, c = tokens.shape
        h, d = self.heads, c // self.heads
        k, v = self.kv(self.norm_kv(tokens)).reshape(n, t, 2, h, d).unbind(2)
        query = self.q(self.norm_q(q)).reshape(n, h, d)
        scores = torch.einsum("nhd,nshd->nhs", query, k) * d ** -0.5
        scores = scores.masked_fill(absent[:, None, :], float("-inf"))
        attn = torch.einsum("nhs,nshd->nhd", scores.softmax(dim=-1), v).reshape(n, c)
        q = q + self.proj(attn)
        return q + self.mlp(self.norm2(q)), scores


class TemporalAttentionNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, tokens: dict, width: int = 32,
                 heads: int = 4, layers: int = 2, patch: int = 4):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        width = _positive_int(width, "width", 4)
        heads = _positive_int(heads, "heads")
        layers = _positive_int(layers, "layers", 1)
        patch = _positive_int(patch, "patch")
        if width % heads:
            raise ValueError(f"tattn: width {width} is not a multiple of heads {heads}")
        toks, context, n_bands, n_sar = _check_tokens(tokens, in_channels)
        self.n_tokens, self.n_bands, self.heads, self.patch = len(toks), n_bands, heads, patch
        self.size_multiple = patch
        zero, one = in_channels, in_channels + 1  # two constant channels appended to the input
        rows = []
        for i, tok in enumerate(toks):
            dt, present = (tok["dt"], tok["present"]) if i else (zero, one)
            rows.append([*tok["bands"], tok["valid"], *tok["sar"], tok["sar_present"], *tok["doy"],
                         dt, present, one if i == 0 else zero])
        self.n_features = len(rows[0])
        self._clear_feature = n_bands  # where a token row holds the clear flag (after the bands)
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

        f = self.n_features
        self.encode_target = nn.Sequential(
            nn.Conv2d(f, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.encode_patch = nn.Sequential(
            nn.Conv2d(f, width, patch, stride=patch, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.time = nn.Linear(2 * len(PERIODS_DAYS), width)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.ConvTranspose2d(width, width, patch, stride=patch)
        self.decode = nn.Sequential(
            nn.Conv2d(2 * width + heads * n_bands + len(context), width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(width, out_channels, 1)  # registered last: the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"tattn: tile size {h} x {w} is not a multiple of the patch size {p}")
        t, f, heads, b = self.n_tokens, self.n_features, self.heads, self.n_bands
        const = x.new_zeros((n, 2, h, w))
        const[:, 1] = 1.0
        xe = torch.cat([x, const], dim=1)
        feats = xe.index_select(1, self._gather).reshape(n, t, f, h, w)
        target_full = self.encode_target(feats[:, 0])          # (n, C, h, w)
        tok = self.encode_patch(feats.reshape(n * t, f, h, w))  # (n t, C, h/p, w/p)
        c, hp, wp = tok.shape[1:]
        # one constant per tile and token: read at the tile's first pixel
        dt = xe[:, self._dt_idx, 0, 0].float()                 # (n, t), units of 30 days
        present = xe[:, self._present_idx, 0, 0] > 0.5         # (n, t); the target always is
        phase = dt[..., None] * self._omega                    # (n, t, P)
        enc = self.time(torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1))  # (n, t, C)
        seq = tok.reshape(n, t, c, hp * wp).permute(0, 3, 1, 2) + enc[:, None].to(tok.dtype)
        seq = seq.reshape(n * hp * wp, t, c)
        absent = (~present)[:, None].expand(n, hp * wp, t).reshape(n * hp * wp, t)
        query = seq[:, 0]
        for block in self.blocks:
            query, scores = block(query, seq, absent)
        target = self.norm(query).reshape(n, hp, wp, c).permute(0, 3, 1, 2)
        up = self.up(target.contiguous())                      # (n, C, h, w)
        # item 5: the last scores per pixel, over the dates clear (and present) there
        scores = scores.reshape(n, hp, wp, heads * t).permute(0, 3, 1, 2)
        scores = nn.functional.interpolate(scores, scale_factor=p, mode="nearest")
        usable = (feats[:, :, self._clear_feature] > 0.5) & present[..., None, None]  # (n, t, h, w)
        scores = scores.reshape(n, heads, t, h, w).masked_fill(~usable[:, None], float("-inf"))
        # a softmax that gives all-zero weights (not NaN) where no date is usable
        top = scores.detach().amax(dim=2, keepdim=True).clamp_min(-1e4)
        weights = (scores - top).exp()                         # (n, heads, t, h, w)
        weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(1e-12)
        # a product and a sum: 3x faster than einsum's route through bmm here
        pooled = (weights.unsqueeze(3) * feats[:, None, :, :b]).sum(2).reshape(n, heads * b, h, w)
        ctx = x.index_select(1, self._context_idx)
        return self.head(self.decode(torch.cat([up, target_full, pooled.to(up.dtype), ctx], dim=1)))


@register("tattn", layout="sequence", revision=2)  # 1: self-attention at half resolution
def build(in_channels: int, out_channels: int, *, tokens: dict, width: int = 32, heads: int = 4,
          layers: int = 2, patch: int = 4) -> TemporalAttentionNet:
    return TemporalAttentionNet(in_channels, out_channels, tokens, width=width, heads=heads,
                                layers=layers, patch=patch)
