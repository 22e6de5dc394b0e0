"""Throughput of GapFillDataset through a torch DataLoader, by worker count and start method.

Builds a synthetic cube (default T=40 dates, C=7 channels: B02 B03 B04 B08 valid VV VH, 256 x 256
pixels, blobby clouds, NaN holes, dates without SAR), exports it with ``export_tiles`` to a
temporary directory (size 64, overlap 16), then iterates one full epoch of
``DataLoader(GapFillDataset(...), batch_size=16)`` for num_workers 0, 1 and 2 (``fork`` and
``spawn`` for > 0), three times each, and prints the medians as a Markdown table:

* ``epoch samples/s``: samples / wall time of the whole epoch, worker start-up included (what a
  training loop without ``persistent_workers`` pays every epoch);
* ``steady samples/s``: samples after the first batch / time after the first batch;
* ``first batch s``: time to the first batch (worker start-up + first samples).

The table is run twice by default: with torch's default intra-op thread count in the main
process, and with ``torch.set_num_threads(1)`` there (DataLoader workers always use one
thread). On small machines the default OpenMP pool in the main process competes with the
loading work (collate runs in the main process) -- compare the two settings.

Usage::

    python benchmarks/bench_loader.py [--json results.json] [--dates 40] [--size 256] [--runs 3]
                                      [--main-threads default 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from stfuse.dataset import GapFillDataset
from stfuse.tiles import export_tiles

OPTICAL = ("B02", "B03", "B04", "B08")
SAR = ("VV", "VH")


def synthetic_cube(n_dates: int, height: int, width: int, seed: int = 0):
    """Random reflectance/backscatter with coarse-grained clouds and NaN holes."""
    rng = np.random.default_rng(seed)
    n_opt, n_sar = len(OPTICAL), len(SAR)
    cube = np.empty((n_dates, n_opt + 1 + n_sar, height, width), dtype=np.float32)
    cube[:, :n_opt] = rng.uniform(0.0, 0.5, (n_dates, n_opt, height, width))
    # clouds: random 16 x 16 px cells, each date with its own cloud cover
    cell = 16
    coarse = rng.random((n_dates, -(-height // cell), -(-width // cell)))
    cover = rng.beta(0.7, 0.7, n_dates)[:, None, None]
    cloudy = np.kron(coarse < cover, np.ones((cell, cell), dtype=bool))[:, :height, :width]
    cube[:, n_opt] = np.where(cloudy, 0.0, 1.0)
    holes = rng.random((n_dates, height, width)) < 0.01
    cube[:, n_opt][holes] = np.nan
    cube[:, :n_opt][np.broadcast_to(holes[:, None], cube[:, :n_opt].shape)] = np.nan
    cube[:, n_opt + 1:] = rng.normal(-12.0, 3.0, (n_dates, n_sar, height, width))
    no_sar = rng.random(n_dates) < 0.1
    cube[no_sar, n_opt + 1:] = np.nan
    channels = ([{"name": n, "sensor": "S2", "kind": "optical"} for n in OPTICAL]
                + [{"name": "valid", "sensor": "S2", "kind": "valid"}]
                + [{"name": n, "sensor": "S1", "kind": "sar"} for n in SAR])
    t0 = pd.Timestamp("2021-04-01T10:30:00Z")
    dates = []
    for d in range(n_dates):
        ts = t0 + pd.Timedelta(days=5 * d)
        dates.append({
            "start_time": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "optical_id": f"S2_{d:03d}",
            "sar_id": None if no_sar[d] else f"S1_{d:03d}",
            "sar_gap_days": None if no_sar[d] else float(rng.uniform(-3, 3)),
            "clear_fraction": float(1.0 - cloudy[d].mean()),
        })
    return cube, channels, dates


def one_epoch(dataset, num_workers: int, context: str | None, batch_size: int):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        multiprocessing_context=context if num_workers else None,
                        generator=torch.Generator().manual_seed(0))
    n = first_n = 0
    start = time.perf_counter()
    first = None
    for batch in loader:
        n += batch["image"].shape[0]
        if first is None:
            first = time.perf_counter() - start
            first_n = n
    total = time.perf_counter() - start
    steady = (n - first_n) / (total - first) if total > first and n > first_n else float("nan")
    return {"samples": n, "seconds": total, "epoch_sps": n / total, "steady_sps": steady,
            "first_batch_s": first}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--dates", type=int, default=40)
    parser.add_argument("--size", type=int, default=256, help="region height = width (px)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=2, help="k_neighbours")
    parser.add_argument("--extra-mask-fraction", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--main-threads", nargs="+", default=["default", "1"],
                        help="torch intra-op threads in the main process: 'default' or a number")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    thread_settings = [default_threads if v == "default" else int(v) for v in args.main_threads]

    cube, channels, dates = synthetic_cube(args.dates, args.size, args.size)
    configs = [(w, None) if w == 0 else (w, ctx)
               for w in args.workers for ctx in ((None,) if w == 0 else ("fork", "spawn"))]
    results = []
    with tempfile.TemporaryDirectory(prefix="stfuse-bench-") as tmp:
        t0 = time.perf_counter()
        summary = export_tiles(cube, channels, dates, tmp, size=args.tile, overlap=args.overlap,
                               min_valid_fraction=0.0, block_size=128, val_fraction=0.25,
                               seed=0)
        export_s = time.perf_counter() - t0
        ds = GapFillDataset(tmp, "train", k_neighbours=args.k, min_target_valid=0.05,
                            extra_mask_seed=0, extra_mask_fraction=args.extra_mask_fraction)
        print(f"cube {tuple(cube.shape)} -> {summary['n_tiles']} tiles "
              f"({summary['n_train']} train, {summary['n_val']} val), "
              f"{summary['bytes_written'] / 1e6:.1f} MB in {export_s:.2f} s; "
              f"{len(ds)} train samples/epoch, {ds.n_input_channels} input channels",
              file=sys.stderr)
        for threads in thread_settings:
            torch.set_num_threads(threads)
            for workers, ctx in configs:
                runs = [one_epoch(ds, workers, ctx, args.batch_size) for _ in range(args.runs)]
                row = {"main_threads": threads, "num_workers": workers,
                       "start_method": ctx or "-", "samples": runs[0]["samples"]}
                for key in ("epoch_sps", "steady_sps", "first_batch_s", "seconds"):
                    row[key] = statistics.median(r[key] for r in runs)
                row["epoch_sps_runs"] = [r["epoch_sps"] for r in runs]
                results.append(row)
                print(f"  main threads={threads} workers={workers} {ctx or '-'}: "
                      f"{row['epoch_sps']:.0f} samples/s", file=sys.stderr)
        torch.set_num_threads(default_threads)

    print(f"\nGapFillDataset + DataLoader(batch_size={args.batch_size}), "
          f"cube T={args.dates} C={cube.shape[1]} {args.size}x{args.size}, tiles "
          f"{args.tile}px overlap {args.overlap}, k={args.k}, "
          f"extra_mask_fraction={args.extra_mask_fraction}; median of {args.runs} epochs; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}\n")
    print("| main torch threads | num_workers | start method | samples/epoch | epoch samples/s "
          "| steady samples/s | first batch s |")
    print("|---:|---:|:---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['main_threads']} | {r['num_workers']} | {r['start_method']} | "
              f"{r['samples']} | {r['epoch_sps']:.0f} | {r['steady_sps']:.0f} | "
              f"{r['first_batch_s']:.3f} |")
    if args.json:
        payload = {"params": vars(args), "cube_shape": list(cube.shape),
                   "export": {k: v for k, v in summary.items() if k != "files"},
                   "export_seconds": export_s, "cpus": os.cpu_count(),
                   "python": platform.python_version(), "torch": torch.__version__,
                   "default_threads": default_threads, "results": results}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
