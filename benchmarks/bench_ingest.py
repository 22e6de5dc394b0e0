"""Ingest speed on ../shared/data/flanders_2017 (1616 rasters): stfuse's ingest stage against the naive path.

stfuse: `snakemake --cores 2 ingest` on config/studies/flanders_2017.yaml in a fresh work folder (manifest
checks, project creation, one r.in.gdal per band on a VRT stack, one t.register per sensor), median of
--repeat runs. Naive: one r.import and one t.register call per map, as a hand-written script would do,
timed on --naive-maps maps in the same run and extrapolated to all rasters (the full naive run takes
minutes). Prints a Markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stfuse import grass, manifest  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flanders_2017"
STUDY = ROOT / "config" / "studies" / "flanders_2017.yaml"


def time_stfuse(repeat: int) -> list[float]:
    snakemake = Path(sys.executable).with_name("snakemake")
    times = []
    for i in range(repeat):
        with tempfile.TemporaryDirectory(prefix="stfuse_bench_") as work:
            config = yaml.safe_load(STUDY.read_text())
            config["input"]["manifest"] = str(DATA / "manifest.csv")  # the work folder is elsewhere
            (Path(work) / "study.yaml").write_text(yaml.safe_dump(config))
            cmd = [str(snakemake), "-s", str(ROOT / "Snakefile"), "--directory", work, "--cores", "2",
                   "ingest", "--quiet", "all", "--configfile", str(Path(work) / "study.yaml")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                sys.exit(f"snakemake failed:\n{proc.stderr[-3000:]}")
        print(f"  stfuse run {i + 1}/{repeat}: {times[-1]:.1f} s", file=sys.stderr)
    return times


def time_naive(n_maps: int) -> float:
    """Seconds per map for r.import + t.register, one process each, on the first n_maps rasters."""
    rows = manifest.read_manifest(DATA / "manifest.csv").iloc[:n_maps]
    with tempfile.TemporaryDirectory(prefix="stfuse_naive_") as tmp:
        project = grass.create_project(Path(tmp) / "naive", 32631)
        with grass.session(project) as gs:
            gs.run_command("g.region", n=5629680, s=5629040, w=501360, e=502000, res=10)
            gs.run_command("t.create", output="naive", type="strds", temporaltype="absolute",
                           title="naive", description="naive")
            t0 = time.perf_counter()
            for i, r in enumerate(rows.itertuples()):
                name = f"m{i}"
                gs.run_command("r.import", input=r.path, output=name, resample="nearest", extent="region",
                               quiet=True)
                gs.run_command("t.register", input="naive", maps=name,
                               start=r.start_time.strftime("%Y-%m-%d %H:%M:%S"), quiet=True)
            return (time.perf_counter() - t0) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-maps", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is absent")
    n_rasters = len(manifest.read_manifest(DATA / "manifest.csv"))
    runs = time_stfuse(args.repeat)
    per_map = time_naive(args.naive_maps)
    result = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), machine=f"{platform.node()} ({platform.machine()}, "
        f"{__import__('os').cpu_count()} cores)", grass=grass.grass_config("version"), rasters=n_rasters,
        stfuse_runs_s=runs, stfuse_median_s=statistics.median(runs), naive_per_map_s=per_map,
        naive_maps_timed=args.naive_maps, naive_extrapolated_s=per_map * n_rasters,
    )
    print(f"\nIngest of {n_rasters} rasters (flanders_2017), {result['date']}, {result['machine']}, "
          f"GRASS {result['grass']}\n")
    print("| method | time | per raster |\n| --- | --- | --- |")
    print(f"| stfuse `snakemake --cores 2 ingest` (median of {args.repeat}) | {result['stfuse_median_s']:.1f} s "
          f"| {1000 * result['stfuse_median_s'] / n_rasters:.1f} ms |")
    print(f"| naive r.import + t.register per map ({args.naive_maps} maps timed, extrapolated) "
          f"| {result['naive_extrapolated_s']:.0f} s | {1000 * per_map:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
