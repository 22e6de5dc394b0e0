"""Gap filling of a whole region with a trained model (checkpoint from :func:`stfuse.train.train`).

:func:`predict_cube` takes the full-region cube the caller read from GRASS -- float32
(T, C, H, W), the channel layout :func:`stfuse.tiles.export_tiles` uses (optical bands, the
``valid`` band, SAR bands, static layers; ``channels`` and ``dates`` as in ``channels.json``)
-- and predicts the optical bands at every date over the whole region:

* Temporal prior: when the model was trained with the prior channels (checkpoint input channels
  ``<band>@prior``), they are computed on the *whole* cube passed in and appended to it with
  :func:`stfuse.prior.append_prior`, the function :func:`stfuse.tiles.export_tiles` uses, one
  strip of window rows at a time (a pixel's prior depends only on its own time series, so this is
  bit for bit the whole cube's prior, without a copy of the whole cube); the caller passes the
  cube without them. Checkpoints trained without the prior
  get the cube as it is.
* The region is covered with overlapping square windows (:func:`stfuse.tiles.tile_origins`;
  default: the checkpoint's tile size and an overlap of a quarter of it). For each window and
  date the model input is built by :class:`stfuse.dataset.InputAssembler`, the very code the
  training dataset uses, so training and inference cannot drift apart. Windows are run in
  batches.
* Overlapping predictions are blended with a separable raised-cosine (Hann) weight window
  ``max(sin^2(pi (i + 0.5) / s), 1e-3)``: a window's border pixels, where zero padding makes
  the model least reliable, get almost no weight where another window sees them from its
  centre, so no seams show; the small floor keeps pixels at the border of the region, seen
  only by border windows, weighted.
* A region smaller than the tile size is padded with NaN (no data) to the tile size and the
  result cropped back.
* Blocks (:func:`predict_block`): a block job runs the windows of the *whole region's* grid
  that touch its core, on its read window (core + halo, :mod:`stfuse.blocks`), and keeps the
  core. Each core cell gets the same windows, blend weight and sums (same order) as in
  :func:`predict_cube`, and each (window, date) sample the same forward pass: CPU torch
  results depend on the *size* of the batch a sample runs in (oneDNN picks convolution kernels
  by batch size: a lone sample, batches of 2..8 and of 16 differ in the last bits), not on its
  companions or place. So every sample runs in a batch of the size the whole-region run gives
  it -- ``batch_size``, or the size of the region's last, short batch -- short batches padded
  with zero inputs (:func:`_forward_sizes`). The pasted cores are :func:`predict_cube` bit for
  bit, and :func:`predict_cube` itself is unchanged (its batches need no padding).

Results are in physical units (the normalisation is undone): ``prediction`` everywhere, and
``filled``, which keeps the observed values wherever the pixel is clear at t (``valid == 1``
and every optical band finite, :func:`stfuse.tiles.clear_mask`) and takes the prediction
elsewhere; ``filled_flag`` marks the filled pixels.

Uncertainty: a checkpoint trained with an uncertainty head (its ``uncertainty`` entry,
:mod:`stfuse.models.uncertainty`) also gives ``std``, the predictive standard deviation of every
filled cell in physical units (the normalised std times the band's std), 0 where the cell is
observed (clear: the value is the observation). Overlapping windows blend the *variances* with
the weights of the mean (a weighted mean of the windows' variances, then the square root), sums
in the same order, so a block's std is the whole region's bit for bit too. Checkpoints without
the entry (older ones) or with ``"none"`` give ``std`` None.

Dates without optical help: a date whose neighbours (t-K..t+K) are all absent (ends of the
series) or fully cloudy, and which is itself fully cloudy, is still filled. The model then sees
zeros in every optical input, with ``valid@...`` = 0 and ``present@...`` flags saying which
neighbours exist, and predicts from what is left: the SAR bands paired with t (when
``sar_gap_days`` is not None), their time gap and the static layers. Such predictions are the
least accurate ones; ``filled_flag`` marks them like every filled pixel, and the caller can
recognise these dates from the clear fractions. Pixels with no data at all (NaN in every
channel) are filled too: drop them with the caller's own mask if they lie outside the area of
interest.
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass

import numpy as np
from stfuse._optional import require_torch

torch = require_torch(__name__)

from stfuse.dataset import InputAssembler
from stfuse.logs import Progress
from stfuse.models import size_multiple
from stfuse.models import uncertainty as heads
from stfuse.prior import PRIOR_KIND, append_prior, prior_layout
from stfuse.tiles import check_cube_channels, tile_origins
from stfuse.train import (
    check_channels,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    torch_threads,
)

__all__ = ["predict_cube", "predict_block", "blend_window", "checkpoint_assembler", "WINDOW_FLOOR"]

logger = logging.getLogger("stfuse.infer")

#: smallest weight of the blending window (its border pixels)
WINDOW_FLOOR = 1e-3


def blend_window(size: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """(size, size) float32 separable Hann window, ``>= floor`` everywhere, 1 at the centre."""
    i = np.arange(size, dtype=np.float64)
    w1 = np.maximum(np.sin(np.pi * (i + 0.5) / size) ** 2, floor)
    return np.outer(w1, w1).astype(np.float32)


def _int_arg(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def checkpoint_assembler(ckpt: dict, channels, dates) -> InputAssembler:
    """The cube's input assembler; ValueError naming the channels if it does not fit ``ckpt``."""
    stats = {str(c["name"]): {"mean": c["mean"], "std": c["std"]} for c in ckpt["stats"]}
    known = dict(stats)
    for ch in channels:  # placeholder statistics, only to name the cube's input channels
        known.setdefault(str(ch["name"]), {"mean": 0.0, "std": 1.0})
    layout = ckpt.get("input_layout", "stacked")  # a token model's checkpoint says "sequence"
    names = InputAssembler(channels, dates, known, ckpt["k_neighbours"], layout).input_channels
    check_channels(ckpt, names)
    return InputAssembler(channels, dates, stats, ckpt["k_neighbours"], layout)


def predict_cube(checkpoint, cube, channels, dates, *, tile_size=None, overlap=None,
                 batch_size=8, device="auto", threads=None, out=None) -> dict:
    """Predict and fill the optical bands of ``cube`` (T, C, H, W) at every date.

    Parameters
    ----------
    checkpoint
        Path of a checkpoint written by :func:`stfuse.train.train` (``model.pt``), or the dict
        :func:`stfuse.train.load_checkpoint` returned.
    cube, channels, dates
        The full-region cube and its channel and date dicts, as for
        :func:`stfuse.tiles.export_tiles` (without prior channels: they are computed here when
        the model uses them). The channels must give the model's input channels exactly
        (ValueError naming the missing and unexpected ones otherwise); the dates may differ
        from the training dates.
    tile_size, overlap
        Window size (default: the checkpoint's tile size; must be a multiple of the model's
        ``size_multiple``) and overlap (default ``tile_size // 4``).
    batch_size
        Windows (window x date) per forward pass.
    device
        ``"auto"`` (CUDA if available, with float16 autocast), ``"cpu"``, ``"cuda"``..
    threads
        ``torch.set_num_threads`` for this call (restored after); None leaves it as it is.
        Predictions are bit-identical only for the same thread count (and machine and torch
        build, see :mod:`stfuse.train`), so pass a fixed number, not the cores a scheduler
        happens to grant.

    Returns a dict: ``prediction`` float32 (T, B, H, W), the model's optical bands in physical
    units; ``filled`` float32 (T, B, H, W), observed where clear at t, predicted elsewhere;
    ``filled_flag`` uint8 (T, H, W), 1 where ``filled`` holds a prediction; ``std`` float32
    (T, B, H, W), the predictive standard deviation in physical units where filled and 0 where
    observed, or None when the checkpoint has no uncertainty head; ``uncertainty`` (the head,
    ``"none"`` without); ``bands`` (the B optical band names), ``tile_size``, ``overlap``,
    ``n_windows``, ``seconds``.
    """
    t_start = time.perf_counter()
    with torch_threads(threads):
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        channels = _check_cube(cube, channels, dates)
        run = _prepare(ckpt, channels, dates, tile_size=tile_size, overlap=overlap,
                       batch_size=batch_size, device=device)
        return _predict_region(run, cube, dates, out, t_start)


def predict_block(checkpoint, cube, channels, dates, block, region_rows, region_cols, *,
                  tile_size=None, overlap=None, batch_size=8, device="auto", threads=None,
                  out=None) -> dict:
    """:func:`predict_cube` of the whole region, for the core of one block (:mod:`stfuse.blocks`).

    ``cube`` (T, C, read_rows, read_cols) is the block's read window (core + halo) of the
    ``region_rows`` x ``region_cols`` region; the other arguments are :func:`predict_cube`'s.
    The windows are those of the *whole region's* grid (``tile_origins(region_rows,
    region_cols, ...)``) that touch the core, in the same order; each must lie inside the read
    window (ValueError saying the halo is too small otherwise: ``blocks.halo`` must be at least
    the tile size, :func:`stfuse.blocks.halo_for`). Every core cell then gets the same windows,
    weights, sums (same order) and per-sample forward passes (same batch size, see
    :func:`_forward_sizes`) as in the whole-region run, so the cores of a plan pasted together
    (:func:`stfuse.blocks.paste`) are :func:`predict_cube` bit for bit.

    Returns :func:`predict_cube`'s dict, core-sized: ``prediction``, ``filled`` and ``std`` (T, B,
    rows, cols), ``filled_flag`` (T, rows, cols) (``out``: arrays of those shapes to write into),
    plus ``windows``, the region (row, col) origins of the windows run. A region smaller than
    one window (NaN-padded by :func:`predict_cube`) must be a single block, the whole region.
    """
    t_start = time.perf_counter()
    with torch_threads(threads):
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        channels = _check_cube(cube, channels, dates)
        region_rows = _int_arg(region_rows, "region_rows", 1)
        region_cols = _int_arg(region_cols, "region_cols", 1)
        _check_block(block, cube.shape, region_rows, region_cols)
        run = _prepare(ckpt, channels, dates, tile_size=tile_size, overlap=overlap,
                       batch_size=batch_size, device=device)
        if min(region_rows, region_cols) < run.size:  # predict_cube pads the region: one block only
            if (block.read_rows, block.read_cols, block.rows, block.cols) != (region_rows, region_cols) * 2:
                raise ValueError(f"the {region_rows} x {region_cols} region is smaller than one "
                                 f"{run.size}-cell window: it must be a single block, not cut into "
                                 f"blocks like {block.id}")
            res = _predict_region(run, cube, dates, out, t_start)
            res["windows"] = [list(o) for o in tile_origins(max(run.size, region_rows),
                                                            max(run.size, region_cols),
                                                            run.size, run.overlap)]
            return res
        return _predict_core(run, cube, dates, block, region_rows, region_cols, out, t_start)


# ------------------------------------------------------------------------------------------
# the parts both share

@dataclass
class _Run:
    """A checkpoint and arguments, resolved and checked: what the window loop needs."""

    assembler: InputAssembler
    model: torch.nn.Module
    dev: torch.device
    size: int
    overlap: int
    batch_size: int
    use_prior: bool
    base_channels: list
    n_work: int  # channels of the working cube (the cube's, then the prior's)
    head: str = heads.NONE  # the checkpoint's uncertainty head

    @property
    def amp(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def n_bands(self) -> int:
        return len(self.assembler.target_channels)


def _check_cube(cube, channels, dates) -> list[dict]:
    """The cube's checked channels; ValueError for a cube, channels or dates that do not fit."""
    if not isinstance(cube, np.ndarray) or cube.ndim != 4:
        raise ValueError(f"cube must be a (T, C, H, W) numpy array, got "
                         f"{getattr(cube, 'shape', type(cube))}")
    n_dates, n_channels = cube.shape[:2]
    channels = check_cube_channels(channels, n_channels)
    if len(dates) != n_dates:
        raise ValueError(f"len(dates) is {len(dates)} but the cube has T={n_dates} dates")
    if any(ch["kind"] == PRIOR_KIND for ch in channels):
        raise ValueError("pass the cube without prior channels: predict_cube computes them "
                         "from the whole cube, as export_tiles does")
    return channels


def _prepare(ckpt, channels, dates, *, tile_size, overlap, batch_size, device) -> _Run:
    base_channels = channels
    use_prior = any(ch.get("kind") == PRIOR_KIND for ch in ckpt["channels"])
    if use_prior:  # the channels append_prior adds (same code as export_tiles)
        channels = [dict(ch) for ch in channels] + prior_layout(channels)
    assembler = checkpoint_assembler(ckpt, channels, dates)
    batch_size = _int_arg(batch_size, "batch_size", 1)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, dev)
    multiple = size_multiple(model)
    size = _int_arg(ckpt["tile_size"] if tile_size is None else tile_size, "tile_size", 1)
    if size % multiple:
        raise ValueError(f"tile_size {size} is not a multiple of {multiple}, which model "
                         f"{ckpt['model']!r} {ckpt['model_params']} needs")
    overlap = size // 4 if overlap is None else _int_arg(overlap, "overlap", 0)
    if overlap >= size:
        raise ValueError(f"overlap must be < tile_size ({size}), got {overlap}")
    return _Run(assembler, model, dev, size, overlap, batch_size, use_prior, base_channels,
                len(channels), heads.check_head(ckpt.get("uncertainty")))


def _outputs(out, n_dates, n_bands, height, width, head=heads.NONE) -> dict:
    """The caller's output arrays, checked against the result shapes."""
    if out is None:
        return {}
    want = {"prediction": ((n_dates, n_bands, height, width), np.float32),
            "filled": ((n_dates, n_bands, height, width), np.float32),
            "filled_flag": ((n_dates, height, width), np.uint8)}
    if head != heads.NONE:
        want["std"] = ((n_dates, n_bands, height, width), np.float32)
    unknown = set(out) - set(want)
    if unknown:
        why = " (std: the checkpoint has no uncertainty head)" if "std" in unknown else ""
        raise ValueError(f"out: unknown keys {sorted(unknown)}{why}; use {sorted(want)}")
    for key, arr in out.items():
        shape, dtype = want[key]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise ValueError(f"out[{key!r}] must be {np.dtype(dtype).name} {shape}, got "
                             f"{arr.dtype} {tuple(arr.shape)}")
    return dict(out)


def _check_block(block, shape, region_rows, region_cols) -> None:
    if block.read_row0 < 0 or block.read_col0 < 0 or block.read_row0 + block.read_rows > region_rows \
            or block.read_col0 + block.read_cols > region_cols:
        raise ValueError(f"block {block.id}'s read window lies outside the {region_rows} x "
                         f"{region_cols} region")
    if not (block.read_row0 <= block.row0 and block.row0 + block.rows <= block.read_row0 + block.read_rows
            and block.read_col0 <= block.col0 and block.col0 + block.cols <= block.read_col0 + block.read_cols):
        raise ValueError(f"block {block.id}: its core is not inside its read window")
    if tuple(shape[2:]) != (block.read_rows, block.read_cols):
        raise ValueError(f"cube is {shape[2]} x {shape[3]} cells, block {block.id}'s read window "
                         f"{block.read_rows} x {block.read_cols}")


def _strip_reader(run: _Run, cube, dates, pad_w=None):
    """``strip_at(r)``: rows r..r+size of the working cube (the cube, its prior channels and,
    with ``pad_w``, NaN padding to ``size`` rows and ``pad_w`` columns).

    The prior of a pixel depends only on its own time series, so the prior of a strip is that
    strip of the whole cube's prior, bit for bit: no whole-cube copy is made, and a block's
    strips hold its cells of the whole region's prior."""
    n_dates, _, height, width = cube.shape
    size = run.size

    def strip_at(r):
        if not (run.use_prior or pad_w is not None):
            return cube[:, :, r:r + size, :]
        part = np.ascontiguousarray(cube[:, :, r:min(r + size, height), :])
        if run.use_prior:
            part = append_prior(part, run.base_channels, dates)[0]
        if pad_w is not None:
            full = np.full((n_dates, run.n_work, size, pad_w), np.nan, dtype=np.float32)
            full[:, :, :part.shape[2], :width] = part
            part = full
        return part

    return strip_at


def _forward_sizes(n_region_items: int, batch_size: int, first_items) -> list[int]:
    """Batch size of the forward pass of each window, as in the whole-region run.

    CPU torch results of a sample depend on the size of the batch it is run in (oneDNN picks
    its convolution kernels by batch size; a lone sample differs from one in a batch of 2..8,
    and those from one in a batch of 16), not on its companions or its place in the batch. The
    whole-region run cuts its (window, date) items into batches of ``batch_size`` and a last,
    smaller one; an item runs in a batch of that same size in every layout: a block runs its
    items in batches of ``batch_size`` and, for those of the region's last batch, one of that
    batch's size, padding short batches with zero inputs. ``first_items``: the region index of
    each window's first item (window index x T); returns one size per window and date,
    flattened."""
    n_full = n_region_items // batch_size * batch_size
    tail = n_region_items - n_full
    return [batch_size if k < n_full else tail for k in first_items]


def _batches(items, sizes):
    """Consecutive runs of items of one forward size n, cut into chunks of at most n: (n, chunk)."""
    chunk, chunk_n = [], None
    for item, n in zip(items, sizes):
        if chunk and (n != chunk_n or len(chunk) == chunk_n):
            yield chunk_n, chunk
            chunk = []
        chunk_n = n
        chunk.append(item)
    if chunk:
        yield chunk_n, chunk


def _clip(r, c, size, area):
    """Slices of window (r, c) and of ``area`` (row0, col0, rows, cols) where they overlap."""
    a_r, a_c, a_h, a_w = area
    r0, r1 = max(r, a_r), min(r + size, a_r + a_h)
    c0, c1 = max(c, a_c), min(c + size, a_c + a_w)
    return ((slice(r0 - r, r1 - r), slice(c0 - c, c1 - c)),
            (slice(r0 - a_r, r1 - a_r), slice(c0 - a_c, c1 - a_c)))


def _blend_weight(origins, size, area) -> np.ndarray:
    """Sum of the blend windows of ``origins`` over ``area``, added in the order given."""
    window = blend_window(size)
    weight = np.zeros(area[2:], dtype=np.float32)
    for r, c in origins:
        (wr, wc), (ar, ac) = _clip(r, c, size, area)
        weight[ar, ac] += window[wr, wc]
    return weight


def _run_windows(run: _Run, strip_at, origins, sizes, n_dates, acc, area, acc_var=None) -> None:
    """Add every window's blended prediction at every date to ``acc`` (T, B) + ``area``'s shape
    (and, with an uncertainty head, its blended predictive variance, normalised units, to ``acc_var``).

    ``origins`` are row-major, in the coordinates of ``strip_at``; ``area`` = (row0, col0,
    rows, cols) is the part of those coordinates ``acc`` holds (each window is clipped to it;
    every product and sum is the one the whole-region run makes there, in the same order).
    ``sizes``: the forward batch size of each item (window by window, date by date).
    """
    size, model, dev, assembler = run.size, run.model, run.dev, run.assembler
    window = blend_window(size)
    items = [(r, c, t) for r, c in origins for t in range(n_dates)]  # window by window
    buf = np.empty((max(sizes, default=1), assembler.n_input_channels, size, size), dtype=np.float32)
    cache, cache_key = {}, None  # per-date pieces of the current window, reused across t
    strip, strip_row = None, None  # rows of the current windows (origins are row-major)
    progress = Progress(logger, "inference", len(items), "window-dates", every_s=30.0)
    with torch.inference_mode():
        for n, part in _batches(items, sizes):
            for j, (r, c, t) in enumerate(part):
                if (r, c) != cache_key:
                    cache, cache_key = {}, (r, c)
                if r != strip_row:
                    strip, strip_row = strip_at(r), r
                buf[j] = assembler.build(strip[:, :, :, c:c + size], t, cache=cache)[0]
            buf[len(part):n] = 0.0  # padding: the batch has the size it has in the whole region
            # blocking copy: ``buf`` is refilled for the next batch right away
            x = torch.from_numpy(buf[:n]).to(dev, memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=run.amp):
                pred = model(x)
            pred = pred.float().cpu().numpy()
            if acc_var is None:
                for j, (r, c, t) in enumerate(part):
                    (wr, wc), (ar, ac) = _clip(r, c, size, area)
                    acc[t, :, ar, ac] += pred[j][:, wr, wc] * window[wr, wc]
            else:
                n_bands = acc.shape[1]
                var = _variance(run.head, pred[:, n_bands:])
                for j, (r, c, t) in enumerate(part):
                    (wr, wc), (ar, ac) = _clip(r, c, size, area)
                    acc[t, :, ar, ac] += pred[j][:n_bands, wr, wc] * window[wr, wc]
                    acc_var[t, :, ar, ac] += var[j][:, wr, wc] * window[wr, wc]
            progress.step(len(part))


def _variance(head: str, log_scale: np.ndarray) -> np.ndarray:
    """Predictive variance (normalised units) from the model's log-scale outputs, clamped as in
    training (:func:`stfuse.models.uncertainty.split`); float32."""
    ls = np.clip(log_scale, heads.LOG_SCALE_MIN, heads.LOG_SCALE_MAX)
    return (np.float32(heads.std_factor(head) ** 2) * np.exp(np.float32(2.0) * ls)).astype(np.float32)


def _finish(run: _Run, acc, weight, cube, outputs, acc_var=None) -> tuple:
    """Divide ``acc`` by ``weight``, undo the normalisation, fill; one date at a time.

    ``cube`` is the cube over the output cells; ``acc`` and ``weight`` hold them in their
    upper-left corner (the rest is NaN padding); ``acc_var`` likewise the blended variances (an
    uncertainty head). Returns (prediction, filled, flag, std or None)."""
    assembler = run.assembler
    n_dates, _, height, width = cube.shape
    padded = acc.shape[-2:] != (height, width)
    mean, std = assembler.target_mean_std()
    prediction = outputs.get("prediction")
    if prediction is None:  # the accumulator itself when it has the output's shape
        prediction = np.empty((n_dates, run.n_bands, height, width), np.float32) if padded else acc
    filled = outputs.get("filled")
    if filled is None:
        filled = np.empty((n_dates, run.n_bands, height, width), dtype=np.float32)
    flag = outputs.get("filled_flag")
    if flag is None:
        flag = np.empty((n_dates, height, width), dtype=np.uint8)
    std_out = None
    if acc_var is not None:
        std_out = outputs.get("std")
        if std_out is None:
            std_out = np.empty((n_dates, run.n_bands, height, width), dtype=np.float32)
    optical = assembler.optical_indices
    w_region = weight[None, :height, :width]
    for t in range(n_dates):  # one date at a time: no whole-cube temporaries
        pred_t = acc[t, :, :height, :width]
        pred_t /= w_region
        pred_t *= std[:, None, None]
        pred_t += mean[:, None, None]
        if prediction is not acc:
            prediction[t] = pred_t
        cube_t = cube[t]
        clear = assembler.clear(cube_t)
        filled[t] = np.where(clear[None], cube_t[optical], pred_t)
        flag[t] = ~clear
        if acc_var is not None:
            var_t = acc_var[t, :, :height, :width]
            var_t /= w_region
            sd_t = np.sqrt(var_t)
            sd_t *= std[:, None, None]
            std_out[t] = np.where(clear[None], np.float32(0.0), sd_t)  # observed: no uncertainty
    return prediction, filled, flag, std_out


def _result(run: _Run, prediction, filled, flag, n_windows, t_start, what, std=None) -> dict:
    n_dates, height, width = flag.shape
    seconds = time.perf_counter() - t_start
    logger.info("%s: %d dates x %d x %d px, %d windows of %d px (overlap %d), "
                "%.1f%% of pixels filled, %.1f s (%.2f Mpx/s) on %s", what, n_dates, height, width,
                n_windows, run.size, run.overlap, 100.0 * flag.mean() if flag.size else 0.0,
                seconds, n_dates * height * width / max(seconds, 1e-9) / 1e6, run.dev)
    return {
        "prediction": prediction,
        "filled": filled,
        "filled_flag": flag,
        "std": std,
        "uncertainty": run.head,
        "bands": list(run.assembler.target_channels),
        "tile_size": run.size,
        "overlap": run.overlap,
        "n_windows": n_windows,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------
# whole region, one block

def _predict_region(run: _Run, cube, dates, out, t_start) -> dict:
    """:func:`predict_cube` once checked: every window of the region (NaN-padded to one window
    when smaller), blended over the whole region."""
    n_dates, _, height, width = cube.shape
    size = run.size
    # regions smaller than one window: pad with no data (NaN), crop at the end
    pad_h, pad_w = max(size, height), max(size, width)
    padded = (pad_h, pad_w) != (height, width)
    outputs = _outputs(out, n_dates, run.n_bands, height, width, run.head)
    origins = tile_origins(pad_h, pad_w, size, overlap=run.overlap)
    area = (0, 0, pad_h, pad_w)
    weight = _blend_weight(origins, size, area)
    sizes = _forward_sizes(len(origins) * n_dates, run.batch_size, range(len(origins) * n_dates))
    acc = np.zeros((n_dates, run.n_bands, pad_h, pad_w), dtype=np.float32)
    acc_var = np.zeros_like(acc) if run.head != heads.NONE else None
    strip_at = _strip_reader(run, cube, dates, pad_w if padded else None)
    _run_windows(run, strip_at, origins, sizes, n_dates, acc, area, acc_var)
    prediction, filled, flag, std = _finish(run, acc, weight, cube, outputs, acc_var)
    del acc, acc_var
    return _result(run, prediction, filled, flag, len(origins), t_start, "predict_cube", std)


def _block_windows(run: _Run, block, region_rows, region_cols):
    """(number of region windows, indices, origins) of the region's windows that touch
    ``block``'s core, in region order; ValueError when one reaches outside the read window (the
    halo is too small)."""
    size = run.size
    picked = []
    region = tile_origins(region_rows, region_cols, size, run.overlap)
    for k, (r, c) in enumerate(region):
        if r < block.row0 + block.rows and r + size > block.row0 \
                and c < block.col0 + block.cols and c + size > block.col0:
            if r < block.read_row0 or r + size > block.read_row0 + block.read_rows \
                    or c < block.read_col0 or c + size > block.read_col0 + block.read_cols:
                raise ValueError(
                    f"block {block.id}: the halo is too small -- window ({r}, {c}) of {size} cells "
                    f"touches the core but reaches outside the read window (rows {block.read_row0}.."
                    f"{block.read_row0 + block.read_rows - 1}, cols {block.read_col0}.."
                    f"{block.read_col0 + block.read_cols - 1}); blocks.halo must be at least the "
                    f"tile size ({size})")
            picked.append((k, (r, c)))
    return len(region), [k for k, _ in picked], [o for _, o in picked]


def _predict_core(run: _Run, cube, dates, block, region_rows, region_cols, out, t_start) -> dict:
    """:func:`predict_block` once checked (the region holds at least one window)."""
    n_dates = cube.shape[0]
    n_region, index, origins = _block_windows(run, block, region_rows, region_cols)
    sizes = _forward_sizes(n_region * n_dates, run.batch_size,
                           [k * n_dates + t for k in index for t in range(n_dates)])
    local = [(r - block.read_row0, c - block.read_col0) for r, c in origins]  # read-window coords
    area = (block.core_row_offset, block.core_col_offset, block.rows, block.cols)
    weight = _blend_weight(local, run.size, area)
    outputs = _outputs(out, n_dates, run.n_bands, block.rows, block.cols, run.head)
    acc = np.zeros((n_dates, run.n_bands, block.rows, block.cols), dtype=np.float32)
    acc_var = np.zeros_like(acc) if run.head != heads.NONE else None
    _run_windows(run, _strip_reader(run, cube, dates), local, sizes, n_dates, acc, area, acc_var)
    core = cube[:, :, area[0]:area[0] + block.rows, area[1]:area[1] + block.cols]
    prediction, filled, flag, std = _finish(run, acc, weight, core, outputs, acc_var)
    del acc, acc_var
    res = _result(run, prediction, filled, flag, len(origins), t_start, f"predict_block {block.id}", std)
    res["windows"] = [list(o) for o in origins]
    return res
