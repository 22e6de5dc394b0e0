"""Peak memory of training against the size of the tile store: positioned reads vs memory maps.

Why: on the block path, training samples a bounded number of tiles per epoch
(``train.samples_per_epoch``) from a tile store that grows with the region, yet its peak RSS grew
2.8x from 512² to 2048² cells (docs/scaling.md). The store used to be memory-mapped, and every
page of a map that a process touches counts in its RSS. :class:`stfuse.dataset.TileFile` reads
each (tile, date) with ``os.preadv`` instead; this script measures both in the same run.

How: one synthetic export (``bench_loader.synthetic_cube``, tiles of ``--tile`` px) is copied
into stores of ``--copies`` blocks each (the same tiles in every block's ``tiles.npy``, as
distinct files, so a store of N copies has N times the tiles and bytes of a region N times
larger). For each store and reader, ``stfuse.train.train`` runs in a fresh process for
``--epochs`` epochs of ``--samples-per-epoch`` samples; the process reports its peak RSS
(``VmHWM``) and the peaks of the file-backed and anonymous parts of its resident set
(``RssFile``, ``RssAnon``, sampled every 0.05 s). Medians of
``--runs`` runs per cell; the copies of one store are written once.

Usage::

    python benchmarks/bench_train_memory.py [--copies 4,16,64] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import synthetic_cube  # noqa: E402

from stfuse.tiles import (BLOCK_FILE, CHANNELS_FILE, CLEAR_FILE, INDEX_FILE,  # noqa: E402
                          STATS_FILE, TILES_FILE, export_tiles)

READERS = ("pread", "memmap")

# Run in a fresh interpreter: ``memmap`` puts back the reader of stfuse <= 2026-12-01
# (np.load(mmap_mode="r") per block file, kept open) as the baseline.
CHILD = r"""
import json, sys, threading, time
import numpy as np
from stfuse import dataset, train

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssFile", "RssAnon")}

peaks = {"RssFile": 0.0, "RssAnon": 0.0}
def sample():  # the file-backed part is gone once the maps are closed: sample it while training
    while True:
        now = status()
        for k in peaks:
            peaks[k] = max(peaks[k], now[k])
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()

store, out, reader, samples, epochs = sys.argv[1:6]
if reader == "memmap":
    def _tiles(self, store=0):
        maps = self.__dict__.setdefault("_memmaps", {})
        if store not in maps:
            maps[store] = np.load(self._store_paths[store], mmap_mode="r")
        return maps[store]
    dataset.GapFillDataset._tiles = _tiles
summary = train.train(store, out, model="unet", model_params={"base_channels": 16, "depth": 2},
                      epochs=int(epochs), batch_size=16, samples_per_epoch=int(samples),
                      num_workers=0, threads=1, resume=False, device="cpu")
print(json.dumps({"peak_mb": status()["VmHWM"], "rss_file_mb": peaks["RssFile"],
                  "rss_anon_mb": peaks["RssAnon"], "seconds": summary["seconds"],
                  "train_samples": summary["train_samples"], "val_samples": summary["val_samples"]}))
"""


def make_store(source: Path, root: Path, copies: int) -> dict:
    """A tile store of ``copies`` blocks, each a copy of ``source``'s tiles (as distinct files)."""
    index = pd.read_csv(source / INDEX_FILE)
    clear = np.load(source / CLEAR_FILE)
    meta = json.loads((source / CHANNELS_FILE).read_text())
    root.mkdir(parents=True)
    names = [f"blocks/c{k:04d}" for k in range(copies)]
    parts = []
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        shutil.copyfile(source / TILES_FILE, root / name / TILES_FILE)
        (root / name / BLOCK_FILE).write_text(json.dumps({"sha256": f"sha256:copy-{k}"}))
        part = index.copy()
        part["store"], part["store_tile"] = name, index["tile"]
        parts.append(part)
    store_index = pd.concat(parts, ignore_index=True)
    store_index["tile"] = np.arange(len(store_index))
    store_index.to_csv(root / INDEX_FILE, index=False)
    np.save(root / CLEAR_FILE, np.concatenate([clear] * copies))
    (root / CHANNELS_FILE).write_text(json.dumps({**meta, "stores": names}))
    shutil.copyfile(source / STATS_FILE, root / STATS_FILE)
    return {"tiles": len(store_index),
            "gb": copies * (source / TILES_FILE).stat().st_size / 1e9}


def run_child(store: Path, out: Path, reader: str, samples: int, epochs: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(out), reader,
                           str(samples), str(epochs)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"training on {store} ({reader}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| blocks in the store | tiles | store GB | reader | peak RSS MB | peak file-backed MB "
            "| peak anonymous MB | train s | peak / smallest store's |\n"
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    first = {r["reader"]: r["peak_mb"] for r in rows if r["copies"] == rows[0]["copies"]}
    for r in rows:
        lines.append(f"| {r['copies']} | {r['tiles']} | {r['gb']:.2f} | {r['reader']} | "
                     f"{r['peak_mb']:.0f} | {r['rss_file_mb']:.0f} | {r['rss_anon_mb']:.0f} | "
                     f"{r['seconds']:.1f} | "
                     f"{r['peak_mb'] / first[r['reader']]:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", default="4,16,64",
                        help="blocks per store, comma-separated (default 4,16,64: the 512², "
                             "1024² and 2048² cells of bench_blocks with 256² blocks)")
    parser.add_argument("--dates", type=int, default=50)
    parser.add_argument("--side", type=int, default=256, help="side of the copied export (px)")
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--samples-per-epoch", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--workdir", help="default: a temporary directory, removed at the end")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    copies = [int(c) for c in args.copies.split(",")]
    readers = args.readers.split(",")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="stfuse-bench-train-mem-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        cube, channels, dates = synthetic_cube(args.dates, args.side, args.side)
        source = work / "source"
        export_tiles(cube, channels, dates, source, size=args.tile, overlap=0,
                     min_valid_fraction=0.0, block_size=4 * args.tile, val_fraction=0.25, seed=0)
        del cube
        rows = []
        for n in copies:
            store = work / f"store{n}"
            info = make_store(source, store, n)
            print(f"store of {n} blocks: {info['tiles']} tiles, {info['gb']:.2f} GB", file=sys.stderr)
            for reader in readers:
                runs = [run_child(store, work / "out", reader, args.samples_per_epoch, args.epochs)
                        for _ in range(args.runs)]
                row = {"copies": n, **info, "reader": reader, "runs": runs}
                for key in ("peak_mb", "rss_file_mb", "rss_anon_mb", "seconds"):
                    row[key] = statistics.median(r[key] for r in runs)
                rows.append(row)
                print(f"  {reader}: peak {row['peak_mb']:.0f} MB (file-backed "
                      f"{row['rss_file_mb']:.0f} MB), {row['seconds']:.1f} s", file=sys.stderr)
            shutil.rmtree(store)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Machine: {platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}; "
          f"{started}; medians of {args.runs} runs; {args.epochs} epoch(s) of "
          f"{args.samples_per_epoch} samples, tiles {args.tile}², {args.dates} dates.\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "started": started,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
