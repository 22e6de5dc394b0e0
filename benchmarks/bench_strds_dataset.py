"""Samples/s of StrdsDataset (straight from GRASS STRDS) against GapFillDataset (exported tiles), same scene.

Makes a synthetic scene (default 256 x 256 cells, ~30 optical dates over 5 months, SAR every 6 days),
ingests it into a throwaway GRASS project in a temporary directory, runs pairing, groups and the cube
read the workflow's way and exports tiles with ``export_tiles`` (size 64, overlap 16). Then, for the
training tiles of that export, both datasets give the same samples (tests/test_strds_dataset.py); each
configuration iterates ``DataLoader(ds, batch_size=16, num_workers=W)`` over the first ``--samples``
samples (``sequential``: tile by tile, as the prior's tile cache likes it; ``shuffled``: a seeded
permutation) ``--runs`` times and the median is printed as a Markdown table, with the machine and date.
Worker start-up is included in every run (no persistent workers).

Usage::

    python benchmarks/bench_strds_dataset.py [--size 256] [--months 5] [--samples 96] [--runs 3] [--json out.json]

(xarray-grass, another way from STRDS to arrays, is not installed here and is not compared.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from stfuse import bridge, grass, ingest, strds, synthetic  # noqa: E402
from stfuse.dataset import GapFillDataset  # noqa: E402

from _scene import sensors  # noqa: E402

TILE = dict(size=64, overlap=16, min_valid_fraction=0.05, block_size=128, val_fraction=0.25, seed=0)
K, MIN_VALID, BATCH = 2, 0.05, 16


def build_scene(root: Path, size: int, months: int) -> tuple[dict, float]:
    """Scene -> GRASS project -> pairing, groups, cube -> tiles (both variants); (project state, seconds)."""
    t0 = time.perf_counter()
    end = (dt.date(2021, 4, 1) + dt.timedelta(days=30 * months)).isoformat()
    scene = synthetic.make_scene(root / "scene", seed=1, width=size, height=size, start="2021-04-01", end=end)
    checked = root / "checked.csv"
    state = ingest.prepare_project(scene, sensors(), {}, root / "grassdata" / "bench", checked)
    states = {s: ingest.ingest_sensor(state, checked, s, spec) for s, spec in sensors().items()}
    bridge.pairing_step(state, states["S2"], states["S1"], root / "pairing", max_gap_days=6)
    bridge.groups_step(state, states["S2"], states["S1"], root / "pairing", root / "groups.json")
    bridge.cube_step(state, root / "groups.json", root / "cube")
    for prior in (True, False):
        bridge.tiles_step(root / "cube", root / f"tiles_{prior}", prior=prior, **TILE)
    grass.own_mapset(state["project"], "bench")
    with grass.session(state["project"], "bench") as gs:
        gs.run_command("g.mapsets", mapset="ingest_S2,ingest_S1", operation="add", quiet=True)
    return state, time.perf_counter() - t0


def datasets(root: Path, state: dict, prior: bool):
    """(GapFillDataset, StrdsDataset) over the same training tiles and statistics."""
    tiles_dir = root / f"tiles_{prior}"
    ref = GapFillDataset(tiles_dir, "train", k_neighbours=K, min_target_valid=MIN_VALID)
    with grass.session(state["project"], "bench"):
        series = strds.open_series("S2@ingest_S2", ["B02", "B03", "B04", "B08"], "S1@ingest_S1", ["VV", "VH"],
                                   max_gap_days=6)
    ds = strds.StrdsDataset(series, stats=tiles_dir / "stats.json", size=TILE["size"], overlap=TILE["overlap"],
                            k_neighbours=K, prior=prior, origins=list(zip(ref.index.row, ref.index.col)),
                            min_target_valid=MIN_VALID)
    assert len(ds) == len(ref), (len(ds), len(ref))
    return ref, ds


def run_once(ds, pick, workers: int) -> float:
    loader = DataLoader(Subset(ds, pick), batch_size=BATCH, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(batch["image"]) for batch in loader)
    assert n == len(pick)
    return time.perf_counter() - t0


def machine() -> str:
    try:
        grass_version = "GRASS " + grass.grass_config("version")
    except (OSError, subprocess.CalledProcessError, grass.GrassError):
        grass_version = "GRASS ?"
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {grass_version.strip()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="scene width and height in cells")
    ap.add_argument("--months", type=int, default=5, help="scene length (optical every ~5 days)")
    ap.add_argument("--samples", type=int, default=96, help="samples per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stfuse_bench_strds_") as tmp:
        root = Path(tmp)
        state, setup_s = build_scene(root, args.size, args.months)
        for prior in (True, False):
            ref, ds = datasets(root, state, prior)
            n = min(args.samples, len(ds))
            orders = {"sequential": list(range(n)),
                      "shuffled": [int(i) for i in np.random.default_rng(0).permutation(len(ds))[:n]]}
            for order, pick in orders.items():
                for workers in args.workers:
                    for name, d in (("GapFillDataset", ref), ("StrdsDataset", ds)):
                        times = [run_once(d, pick, workers) for _ in range(args.runs)]
                        rows.append(dict(dataset=name, prior=prior, order=order, workers=workers, samples=n,
                                         median_s=statistics.median(times), runs_s=times,
                                         samples_per_s=n / statistics.median(times)))
                        print(f"{name:15s} prior={prior!s:5s} {order:10s} workers={workers}: "
                              f"{rows[-1]['samples_per_s']:8.1f} samples/s", file=sys.stderr, flush=True)
        shape = (len(ds.dates), len(ds.series.channels), args.size, args.size)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"StrdsDataset vs GapFillDataset, {when}; {machine()}")
    print(f"scene {shape[0]} dates x {shape[1]} channels x {shape[2]} x {shape[3]} cells, tiles {TILE['size']} "
          f"(overlap {TILE['overlap']}), K={K}, batch {BATCH}; set-up (ingest .. export) {setup_s:.1f} s; "
          f"medians of {args.runs} runs, worker start-up included\n")
    print("| dataset | prior | order | workers | samples | samples/s (median) | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {'on' if r['prior'] else 'off'} | {r['order']} | {r['workers']} | {r['samples']} "
              f"| {r['samples_per_s']:.1f} | {', '.join(f'{t:.2f}' for t in r['runs_s'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(when=when, machine=machine(), rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
