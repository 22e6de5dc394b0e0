"""Training and inference throughput of the gap-filling model (stfuse.train / stfuse.infer).

Builds a synthetic cube with structure (default T=20 dates, 4 optical bands + valid + VV/VH +
a DEM, 256 x 256 px: smooth vegetation fields with a seasonal cycle that drives reflectance and
backscatter, blobby clouds, a few NaN holes, some dates without SAR), exports it with
``export_tiles`` (tiles 64 px, overlap 16) to a temporary directory, then for each device and
thread count, ``--runs`` times:

* ``train samples/s``: one epoch of :func:`stfuse.train.train` (``resume=False``), the
  training phase only (data loading, forward, backward, optimiser step; validation and
  checkpoint writing excluded) -- the ``samples_per_s`` of its summary;
* ``infer Mpx/s``: :func:`stfuse.infer.predict_cube` over the whole cube (every date, windows of
  64 px with the default overlap of 16 px, batch 8), in pixels x dates per second / 1e6.

One warm-up run per setting is not counted; medians are reported as a Markdown table. On CUDA
(mixed precision) the GPU utilisation is sampled every 0.1 s during the timed runs, through
``torch.cuda.utilization()`` (needs pynvml) or else ``nvidia-smi``; mean and max are reported.

Usage::

    python benchmarks/bench_model.py [--device auto|cpu|cuda] [--threads 1 2] [--runs 5]
                                     [--dates 20] [--size 256] [--models unet tattn]
                                     [--tattn-neighbours 4] [--json results.json]

``--device auto`` (default) measures the CPU and, when available, CUDA. ``--models`` measures each
model in the same run, interleaved run by run (so a busy machine slows them alike): the U-Net with
K = 2 neighbours (the default config), the attention model with ``--tattn-neighbours`` (the studies'
``train.neighbours``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import torch

from stfuse.infer import predict_cube
from stfuse.tiles import export_tiles
from stfuse.train import load_checkpoint, train

OPTICAL = ("B02", "B03", "B04", "B08")
SAR = ("VV", "VH")
TILE, OVERLAP, BATCH = 64, 16, 16


def _smooth(rng, height, width, cell):
    """Smooth random field: bilinear interpolation of a coarse normal grid."""
    coarse = rng.normal(size=(height // cell + 2, width // cell + 2))
    y, x = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None]
    return (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
            + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)


def synthetic_cube(n_dates: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h = w = size
    veg = 1.0 / (1.0 + np.exp(-2.0 * _smooth(rng, h, w, 24)))
    green_up = _smooth(rng, h, w, 48) * 0.15 + 0.4  # phenology shifts across the scene
    n_opt, n_sar = len(OPTICAL), len(SAR)
    cube = np.empty((n_dates, n_opt + 1 + n_sar + 1, h, w), dtype=np.float32)
    cover = rng.beta(0.8, 0.8, n_dates)
    no_sar = rng.random(n_dates) < 0.1
    for t in range(n_dates):
        phase = t / max(n_dates - 1, 1)
        v = veg / (1.0 + np.exp(-(phase - green_up) * 12.0))
        cube[t, 0], cube[t, 1] = 0.08 - 0.05 * v, 0.11 - 0.04 * v
        cube[t, 2], cube[t, 3] = 0.15 - 0.12 * v, 0.22 + 0.23 * v
        cube[t, :n_opt] += rng.normal(0.0, 0.005, (n_opt, h, w))
        cloudy = _smooth(rng, h, w, 16) < (cover[t] - 0.5) * 2.0
        cube[t, n_opt] = np.where(cloudy, 0.0, 1.0)
        holes = rng.random((h, w)) < 0.005
        cube[t, n_opt][holes] = np.nan
        cube[t, :n_opt][:, holes] = np.nan
        cube[t, n_opt + 1] = -12.0 + 6.0 * v + rng.normal(0.0, 0.7, (h, w))
        cube[t, n_opt + 2] = -18.0 + 8.0 * v + rng.normal(0.0, 0.7, (h, w))
        if no_sar[t]:
            cube[t, n_opt + 1:n_opt + 1 + n_sar] = np.nan
        cube[t, -1] = 200.0 + 50.0 * _smooth(np.random.default_rng(seed + 1), h, w, 32)
    channels = ([{"name": n, "sensor": "S2", "kind": "optical"} for n in OPTICAL]
                + [{"name": "valid", "sensor": "S2", "kind": "valid"}]
                + [{"name": n, "sensor": "S1", "kind": "sar"} for n in SAR]
                + [{"name": "dem", "sensor": "static", "kind": "static"}])
    t0 = pd.Timestamp("2021-04-01T10:30:00Z")
    dates = [{"start_time": (t0 + pd.Timedelta(days=5 * t)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "optical_id": f"S2_{t:03d}", "sar_id": None if no_sar[t] else f"S1_{t:03d}",
              "sar_gap_days": None if no_sar[t] else float(rng.uniform(-3, 3)),
              "clear_fraction": float(np.nanmean(cube[t, n_opt]))} for t in range(n_dates)]
    return cube, channels, dates


class GpuSampler:
    """Samples GPU utilisation (%) every ``interval`` s in a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device, self.interval, self.samples = device, interval, []
        self._stop = threading.Event()
        self._thread = None
        self.source = None
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.index = index
        try:
            torch.cuda.utilization(index)
            self.source = "torch.cuda.utilization"
        except Exception:  # noqa: BLE001 - no pynvml, or no NVML
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def _read(self):
        if self.source == "torch.cuda.utilization":
            return float(torch.cuda.utilization(self.index))
        out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=5)
        return float(out.stdout.strip().splitlines()[0])

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - sampling must never break the benchmark
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.source:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self):
        if not self.samples:
            return None
        return {"mean": statistics.fmean(self.samples), "max": max(self.samples),
                "n": len(self.samples), "source": self.source}


#: the model settings compared: (train.model, train.model_params); K comes from the command line
MODELS = {"unet": {"base_channels": 16, "depth": 2}, "tattn": {"width": 32, "heads": 4, "layers": 2}}


def measure(tiles_dir, work, cube, channels, dates, device, threads, runs, models):
    """Warm-up + ``runs`` timed runs of one training epoch and one full-cube prediction, per model
    (``models``: name -> K neighbours), the models interleaved run by run."""
    setups = {}
    for name, k in models.items():
        out = os.path.join(work, f"run_{device}_{threads}_{name}")
        kw = dict(model=name, model_params=MODELS[name], k_neighbours=k, epochs=1, batch_size=BATCH,
                  device=device, resume=False, threads=threads)
        train(tiles_dir, out, **kw)  # warm-up
        ckpt = load_checkpoint(os.path.join(out, "model.pt"))
        predict_cube(ckpt, cube[:2], channels, dates[:2], device=device, threads=threads)
        setups[name] = (out, kw, ckpt, [], [])
    pixels = cube.shape[0] * cube.shape[2] * cube.shape[3]
    sampler = GpuSampler(torch.device(device)) if device.startswith("cuda") else None
    if sampler:
        sampler.__enter__()
    try:
        for _ in range(runs):
            for out, kw, ckpt, train_rates, infer_rates in setups.values():
                train_rates.append(train(tiles_dir, out, **kw)["samples_per_s"])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                predict_cube(ckpt, cube, channels, dates, device=device, threads=threads)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                infer_rates.append(pixels / (time.perf_counter() - t0) / 1e6)
    finally:
        if sampler:
            sampler.__exit__()
    return [{
        "model": name, "k_neighbours": models[name], "device": device,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "train_samples_per_s": statistics.median(train_rates),
        "infer_mpx_per_s": statistics.median(infer_rates),
        "train_runs": train_rates, "infer_runs": infer_rates,
        "parameters": _parameters(ckpt), "input_channels": ckpt["in_channels"],
        "gpu_utilisation": sampler.summary() if sampler else None,  # shared by the models
    } for name, (out, kw, ckpt, train_rates, infer_rates) in setups.items()]


def _parameters(ckpt) -> int:
    return sum(v.numel() for k, v in ckpt["state_dict"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="CPU intra-op thread counts to compare (default: 1 and all cores)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dates", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="region height = width (px)")
    ap.add_argument("--models", nargs="+", default=["unet", "tattn"], choices=sorted(MODELS))
    ap.add_argument("--tattn-neighbours", type=int, default=4, help="K of the attention model")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    models = {name: (args.tattn_neighbours if name == "tattn" else 2) for name in args.models}
    logging.basicConfig(level=logging.WARNING)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append("cpu")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        devices.append("cuda")
    cores = os.cpu_count() or 1
    cpu_threads = args.threads or sorted({1, cores})

    t_start = time.perf_counter()
    cube, channels, dates = synthetic_cube(args.dates, args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as work:
        tiles_dir = os.path.join(work, "tiles")
        export = export_tiles(cube, channels, dates, tiles_dir, size=TILE, overlap=OVERLAP,
                              min_valid_fraction=0.05, block_size=128, val_fraction=0.25, seed=0)
        for device in devices:
            for threads in (cpu_threads if device == "cpu" else [None]):
                rows += measure(tiles_dir, work, cube, channels, dates, device, threads,
                                args.runs, models)
    info = {
        "cube": {"dates": args.dates, "channels": len(channels), "height": args.size,
                 "width": args.size},
        "tiles": {"size": TILE, "overlap": OVERLAP, "train": export["n_train"],
                  "val": export["n_val"]},
        "models": {name: {"params": MODELS[name], "k_neighbours": k} for name, k in models.items()},
        "batch_size": BATCH, "runs": args.runs,
        "machine": {"cpu_count": cores, "platform": platform.platform(),
                    "torch": str(torch.__version__),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "seconds": time.perf_counter() - t_start,
    }

    print(f"cube {args.dates} dates x {len(channels)} channels x {args.size} x {args.size}; tiles "
          f"{TILE} px (overlap {OVERLAP}), batch {BATCH}; medians of {args.runs} runs\n")
    print("| model | K | parameters | inputs | device | threads | train samples/s | "
          "infer Mpx/s (px x dates) | GPU util % mean/max |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        gpu = r["gpu_utilisation"]
        util = f"{gpu['mean']:.0f} / {gpu['max']:.0f}" if gpu else "n/a"
        print(f"| {r['model']} | {r['k_neighbours']} | {r['parameters']} | {r['input_channels']} | "
              f"{r['device']} | {r['threads'] if r['device'] == 'cpu' else '-'} | "
              f"{r['train_samples_per_s']:.1f} | {r['infer_mpx_per_s']:.2f} | {util} |")
    print(f"\ntotal {info['seconds']:.0f} s on {cores} CPU cores")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "results": rows}, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
