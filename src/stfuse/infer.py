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

Results are in physical units (the normalisation is undone): ``prediction`` everywhere, and
``filled``, which keeps the observed values wherever the pixel is clear at t (``valid == 1``
and every optical band finite, :func:`stfuse.tiles.clear_mask`) and takes the prediction
elsewhere; ``filled_flag`` marks the filled pixels.

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

import numpy as np
import torch

from stfuse.dataset import InputAssembler
from stfuse.models import size_multiple
from stfuse.prior import PRIOR_KIND, append_prior, prior_layout
from stfuse.tiles import _check_channels, tile_origins
from stfuse.train import (
    check_channels,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    torch_threads,
)

__all__ = ["predict_cube", "blend_window", "WINDOW_FLOOR"]

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


def _assembler(ckpt: dict, channels, dates) -> InputAssembler:
    """The cube's input assembler; ValueError naming the channels if it does not fit ``ckpt``."""
    stats = {str(c["name"]): {"mean": c["mean"], "std": c["std"]} for c in ckpt["stats"]}
    known = dict(stats)
    for ch in channels:  # placeholder statistics, only to name the cube's input channels
        known.setdefault(str(ch["name"]), {"mean": 0.0, "std": 1.0})
    names = InputAssembler(channels, dates, known, ckpt["k_neighbours"]).input_channels
    check_channels(ckpt, names)
    return InputAssembler(channels, dates, stats, ckpt["k_neighbours"])


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
    ``filled_flag`` uint8 (T, H, W), 1 where ``filled`` holds a prediction; ``bands`` (the
    B optical band names), ``tile_size``, ``overlap``, ``n_windows``, ``seconds``.
    """
    with torch_threads(threads):
        return _predict(checkpoint, cube, channels, dates, tile_size=tile_size, overlap=overlap,
                        batch_size=batch_size, device=device, out=out)


def _outputs(out, n_dates, n_bands, height, width) -> dict:
    """The caller's output arrays, checked against the result shapes."""
    if out is None:
        return {}
    want = {"prediction": ((n_dates, n_bands, height, width), np.float32),
            "filled": ((n_dates, n_bands, height, width), np.float32),
            "filled_flag": ((n_dates, height, width), np.uint8)}
    unknown = set(out) - set(want)
    if unknown:
        raise ValueError(f"out: unknown keys {sorted(unknown)}; use {sorted(want)}")
    for key, arr in out.items():
        shape, dtype = want[key]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise ValueError(f"out[{key!r}] must be {np.dtype(dtype).name} {shape}, got "
                             f"{arr.dtype} {tuple(arr.shape)}")
    return dict(out)


def _predict(checkpoint, cube, channels, dates, *, tile_size, overlap, batch_size, device, out=None):
    t_start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    if not isinstance(cube, np.ndarray) or cube.ndim != 4:
        raise ValueError(f"cube must be a (T, C, H, W) numpy array, got "
                         f"{getattr(cube, 'shape', type(cube))}")
    n_dates, n_channels, height, width = cube.shape
    channels = _check_channels(channels, n_channels)
    if len(dates) != n_dates:
        raise ValueError(f"len(dates) is {len(dates)} but the cube has T={n_dates} dates")
    if any(ch["kind"] == PRIOR_KIND for ch in channels):
        raise ValueError("pass the cube without prior channels: predict_cube computes them "
                         "from the whole cube, as export_tiles does")
    base_channels = channels
    use_prior = any(ch.get("kind") == PRIOR_KIND for ch in ckpt["channels"])
    if use_prior:  # the channels append_prior adds (same code as export_tiles)
        channels = [dict(ch) for ch in channels] + prior_layout(channels)
    n_work = len(channels)
    assembler = _assembler(ckpt, channels, dates)
    batch_size = _int_arg(batch_size, "batch_size", 1)

    dev = resolve_device(device)
    amp = dev.type == "cuda"
    model = model_from_checkpoint(ckpt, dev)
    multiple = size_multiple(model)
    size = _int_arg(ckpt["tile_size"] if tile_size is None else tile_size, "tile_size", 1)
    if size % multiple:
        raise ValueError(f"tile_size {size} is not a multiple of {multiple}, which model "
                         f"{ckpt['model']!r} {ckpt['model_params']} needs")
    overlap = size // 4 if overlap is None else _int_arg(overlap, "overlap", 0)
    if overlap >= size:
        raise ValueError(f"overlap must be < tile_size ({size}), got {overlap}")

    # regions smaller than one window: pad with no data (NaN), crop at the end
    pad_h, pad_w = max(size, height), max(size, width)
    padded = (pad_h, pad_w) != (height, width)
    n_bands = len(assembler.target_channels)
    outputs = _outputs(out, n_dates, n_bands, height, width)
    origins = tile_origins(pad_h, pad_w, size, overlap)
    window = blend_window(size)
    acc = np.zeros((n_dates, n_bands, pad_h, pad_w), dtype=np.float32)
    weight = np.zeros((pad_h, pad_w), dtype=np.float32)
    for r, c in origins:
        weight[r:r + size, c:c + size] += window

    def strip_at(r):
        """Rows r..r+size of the working cube (the cube, its prior channels, NaN padding).

        The prior of a pixel depends only on its own time series, so the prior of a strip is
        that strip of the whole cube's prior, bit for bit: no whole-cube copy is made."""
        if not (use_prior or padded):
            return cube[:, :, r:r + size, :]
        part = np.ascontiguousarray(cube[:, :, r:min(r + size, height), :])
        if use_prior:
            part = append_prior(part, base_channels, dates)[0]
        if padded:
            full = np.full((n_dates, n_work, size, pad_w), np.nan, dtype=np.float32)
            full[:, :, :part.shape[2], :width] = part
            part = full
        return part

    items = [(r, c, t) for r, c in origins for t in range(n_dates)]  # window by window
    n_inputs = assembler.n_input_channels
    buf = np.empty((batch_size, n_inputs, size, size), dtype=np.float32)
    cache, cache_key = {}, None  # per-date pieces of the current window, reused across t
    strip, strip_row = None, None  # rows of the current windows (origins are row-major)
    with torch.inference_mode():
        for lo in range(0, len(items), batch_size):
            part = items[lo:lo + batch_size]
            for j, (r, c, t) in enumerate(part):
                if (r, c) != cache_key:
                    cache, cache_key = {}, (r, c)
                if r != strip_row:
                    strip, strip_row = strip_at(r), r
                buf[j] = assembler.build(strip[:, :, :, c:c + size], t, cache=cache)[0]
            # blocking copy: ``buf`` is refilled for the next batch right away
            x = torch.from_numpy(buf[:len(part)]).to(dev, memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
                pred = model(x)
            pred = pred.float().cpu().numpy()
            for j, (r, c, t) in enumerate(part):
                acc[t, :, r:r + size, c:c + size] += pred[j] * window
    del strip, cache

    mean, std = assembler.target_mean_std()
    prediction = outputs.get("prediction")
    if prediction is None:  # the accumulator itself when it has the region's shape
        prediction = np.empty((n_dates, n_bands, height, width), np.float32) if padded else acc
    filled = outputs.get("filled")
    if filled is None:
        filled = np.empty((n_dates, n_bands, height, width), dtype=np.float32)
    flag = outputs.get("filled_flag")
    if flag is None:
        flag = np.empty((n_dates, height, width), dtype=np.uint8)
    optical = assembler.optical_indices
    w_region = weight[None, :height, :width]
    for t in range(n_dates):  # one date at a time: no whole-cube temporaries
        pred_t = acc[t, :, :height, :width]
        pred_t /= w_region
        pred_t *= std[:, None, None]
        pred_t += mean[:, None, None]
        if prediction is not acc:
            prediction[t] = pred_t
        clear = assembler.clear(cube[t])
        filled[t] = np.where(clear[None], cube[t, optical], pred_t)
        flag[t] = ~clear
    del acc
    seconds = time.perf_counter() - t_start
    logger.info("predict_cube: %d dates x %d x %d px, %d windows of %d px (overlap %d), "
                "%.1f%% of pixels filled, %.1f s (%.2f Mpx/s) on %s", n_dates, height, width,
                len(origins), size, overlap, 100.0 * flag.mean() if flag.size else 0.0,
                seconds, n_dates * height * width / max(seconds, 1e-9) / 1e6, dev)
    return {
        "prediction": prediction,
        "filled": filled,
        "filled_flag": flag,
        "bands": list(assembler.target_channels),
        "tile_size": size,
        "overlap": overlap,
        "n_windows": len(origins),
        "seconds": seconds,
    }
