"""Training wall time of the registered models on one study's tiles, in the same run.

Trains each model (the U-Net with K = 2 neighbours, the attention model with ``--tattn-neighbours``)
for ``--epochs`` epochs (the attention model ``--tattn-epochs``, default the same) on the same tile export (default: the demo's heldout tiles, made by
``make demo``), ``--runs`` times, the models interleaved run by run so that a busy machine slows them
alike, and prints the median wall time of a training call (``train.train`` with ``resume=False``,
validation and checkpoints included: what the workflow's train job costs), the ratio to the U-Net, and
how long the attention model took to reach the U-Net's best validation loss of the same run (the first
epoch at or below it, from its ``history.csv``: training time to equal quality). Both models validate on
the same samples with the same masking, so their losses compare.

Usage::

    python benchmarks/bench_train_models.py [--tiles results/demo/heldout/tiles] [--epochs 30]
                                            [--tattn-epochs 60] [--runs 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from stfuse.train import train

MODELS = {"unet": {"base_channels": 16, "depth": 2}, "tattn": {"width": 32, "heads": 4, "layers": 2, "patch": 4}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="results/demo/heldout/tiles", help="an export_tiles directory or tile store")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tattn-neighbours", type=int, default=4)
    ap.add_argument("--tattn-epochs", type=int, default=None, help="epochs of the attention model (default --epochs)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (Path(args.tiles) / "index.csv").is_file():
        raise SystemExit(f"{args.tiles} is not a tile export (no index.csv): run `make demo` first or pass --tiles")
    ks = {"unet": 2, "tattn": args.tattn_neighbours}
    epochs = {"unet": args.epochs, "tattn": args.tattn_epochs or args.epochs}
    walls = {name: [] for name in MODELS}
    best = {}
    to_unet = []  # (epoch, elapsed s) of the attention model at the U-Net's best validation loss
    with tempfile.TemporaryDirectory(prefix="bench_train_models_") as work:
        for run in range(args.runs):
            for name, params in MODELS.items():
                t0 = time.perf_counter()
                summary = train(args.tiles, Path(work) / name, model=name, model_params=params,
                                k_neighbours=ks[name], epochs=epochs[name], patience=epochs[name], resume=False,
                                threads=args.threads)
                walls[name].append(time.perf_counter() - t0)
                best[name] = summary["best_val_loss"]
                print(f"run {run + 1}/{args.runs} {name}: {walls[name][-1]:.1f} s, best val loss "
                      f"{summary['best_val_loss']:.4f}", flush=True)
            history = pd.read_csv(Path(work) / "tattn" / "history.csv")
            reached = history[history["val_loss"] <= best["unet"]]
            to_unet.append((int(reached["epoch"].iloc[0]), float(reached["elapsed_s"].iloc[0]))
                           if len(reached) else (None, None))
            print(f"run {run + 1}/{args.runs} tattn reached the U-Net's best val loss {best['unet']:.4f} at "
                  f"epoch {to_unet[-1][0]} ({to_unet[-1][1]} s of training)", flush=True)
    median = {name: statistics.median(v) for name, v in walls.items()}
    print(f"\n{args.tiles}, {args.threads} torch threads, medians of {args.runs} runs\n")
    print("| model | K | epochs | wall s (median) | x U-Net | best val loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in MODELS:
        print(f"| {name} | {ks[name]} | {epochs[name]} | {median[name]:.1f} | {median[name] / median['unet']:.2f} | "
              f"{best[name]:.4f} |")
    reached = [s for _, s in to_unet if s is not None]
    if len(reached) == len(to_unet):
        print(f"\ntattn reached the U-Net's best validation loss after {statistics.median(reached):.1f} s of training "
              f"(median; epochs {[e for e, _ in to_unet]}), {statistics.median(reached) / median['unet']:.2f}x "
              "the U-Net's whole training call")
    else:
        print(f"\ntattn did not reach the U-Net's best validation loss in {len(to_unet) - len(reached)} of "
              f"{len(to_unet)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tiles": args.tiles, "epochs": epochs, "runs": args.runs, "threads": args.threads,
            "neighbours": ks, "walls": walls, "median": median, "best_val_loss": best,
            "tattn_at_unet_best": [{"epoch": e, "elapsed_s": t} for e, t in to_unet],
            "machine": {"platform": platform.platform(), "torch": str(torch.__version__)}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
