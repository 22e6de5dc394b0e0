#!/usr/bin/env python
"""Benchmark GRASS raster -> NumPy readers (and the writer) against stfuse.grassio.

Creates a throwaway GRASS project in a temporary directory with a SIZE x SIZE FCELL map (random
values, ~5 % nulls) and 500 maps of 64 x 64, then times, interleaved round by round so that load
from other processes hits every method alike, the median of REPEAT runs of:

* ``r.out.bin input=map output=/dev/null`` -- GRASS's own decode, the data thrown away;
* ``grass.script.array.array`` (r.out.bin into a temporary file, then read);
* a pygrass ``RasterRow`` loop copying rows into a numpy array;
* ``stfuse.grassio.read_map`` (default workers, and one worker);
* ``stfuse.grassio.write_map`` and ``grass.script.array.write`` (r.in.bin from a temporary file);
* ``stfuse.grassio.read_maps`` on 500 maps of 64 x 64 (ms per map), against one r.out.bin process
  per map (on 50 of them).

Prints a Markdown table; ``--json PATH`` also writes the numbers as JSON.

    .venv/bin/python benchmarks/bench_reader.py [--size 4000] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stfuse import grassio  # noqa: E402
from stfuse.grass import create_project, session  # noqa: E402

SMALL, N_SMALL, N_SMALL_ROUT = 64, 500, 50


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4000, help="rows and columns of the big map (default 4000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per method (default 5)")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    size, repeat = args.size, max(1, args.repeat)
    mb = size * size * 4 / 1e6  # float32 output

    with tempfile.TemporaryDirectory(prefix="stfuse-bench-") as tmp:
        project = create_project(Path(tmp) / "bench", 32633)
        with session(project) as gs:
            from grass.script import array as garray

            load_before = os.getloadavg()
            gs.run_command("g.region", n=size * 10, s=0, w=0, e=size * 10, res=10)
            gs.mapcalc("big = if(rand(0, 100) < 5, null(), float(rand(0.0, 1000.0)))", seed=42)
            info = gs.raster_info("big")
            assert info["datatype"] == "FCELL" and int(info["rows"]) == size

            t0 = time.perf_counter()
            grassio.region_shape()
            cold_ms = (time.perf_counter() - t0) * 1000  # includes starting the fork server

            def rasterrow():
                from grass.pygrass.raster import RasterRow

                out = np.empty((size, size), dtype=np.float32)
                with RasterRow("big") as rr:
                    for i, row in enumerate(rr):
                        out[i] = row
                return out

            reference = grassio.read_map("big")
            assert np.isnan(reference).any()
            checks = {
                "grass.script.array": lambda: np.asarray(garray.array(mapname="big", null=np.nan, dtype=np.float32)),
                "pygrass RasterRow loop": rasterrow,
            }
            for name, fn in checks.items():  # all readers agree (and are warmed up)
                np.testing.assert_array_equal(fn(), reference, err_msg=name)

            def garray_write():
                a = garray.array(dtype=np.float32)
                a[...] = reference
                a.write("big_garray", null=np.nan, overwrite=True)

            methods = {
                "r.out.bin output=/dev/null (GRASS decode only)": lambda: subprocess.run(
                    ["r.out.bin", "-f", "input=big", "output=/dev/null", "bytes=4"], check=True),
                "grass.script.array.array": checks["grass.script.array"],
                "pygrass RasterRow loop": rasterrow,
                "stfuse.grassio.read_map": lambda: grassio.read_map("big"),
                "stfuse.grassio.read_map (workers=1)": lambda: grassio.read_map("big", workers=1),
                "stfuse.grassio.write_map": lambda: grassio.write_map(reference, "big_copy", overwrite=True),
                "grass.script.array write (r.in.bin)": garray_write,
            }
            times = {name: [] for name in methods}
            for _ in range(repeat):
                for name, fn in methods.items():
                    times[name].append(timed(fn))
            np.testing.assert_array_equal(grassio.read_map("big_copy"), reference)

            # Many small maps: r.mapcalc writes 100 per call (each output holds two open files).
            gs.run_command("g.region", n=SMALL * 10, s=0, w=0, e=SMALL * 10, res=10)
            names = [f"small_{i:04d}" for i in range(N_SMALL)]
            for k in range(0, N_SMALL, 100):
                expr = "\n".join(f"{n} = if(rand(0, 100) < 5, null(), float(rand(0.0, 1.0)) + {i})"
                                 for i, n in enumerate(names[k:k + 100], start=k))
                gs.write_command("r.mapcalc", file="-", stdin=expr, seed=7)
            stack = grassio.read_maps(names)
            assert stack.shape == (N_SMALL, SMALL, SMALL)
            assert np.nanmin(stack[123]) >= 123 and np.nanmax(stack[123]) < 124

            def rout_per_map():
                for n in names[:N_SMALL_ROUT]:
                    subprocess.run(["r.out.bin", "-f", f"input={n}", "output=/dev/null", "bytes=4"], check=True)

            small = {
                f"stfuse.grassio.read_maps, {N_SMALL} maps of {SMALL}x{SMALL}": (lambda: grassio.read_maps(names), N_SMALL),
                f"stfuse.grassio.read_maps (workers=1), {N_SMALL} maps": (lambda: grassio.read_maps(names, workers=1), N_SMALL),
                f"r.out.bin per map, {N_SMALL_ROUT} maps of {SMALL}x{SMALL} (1 process each)": (rout_per_map, N_SMALL_ROUT),
            }
            small_times = {name: [] for name in small}
            for _ in range(repeat):
                for name, (fn, n) in small.items():
                    small_times[name].append(timed(fn) / n)
            load_after = os.getloadavg()

    rows = []
    for name, ts in times.items():
        values = [mb / t for t in ts]
        rows.append({"method": name, "unit": "MB/s", "median": statistics.median(values), "n": len(values),
                     "values": values})
    for name, ts in small_times.items():
        values = [t * 1000 for t in ts]
        rows.append({"method": name, "unit": "ms/map", "median": statistics.median(values), "n": len(values),
                     "values": values})
    rows.append({"method": "stfuse.grassio first call of the process (starts the fork server)", "unit": "ms",
                 "median": cold_ms, "n": 1, "values": [cold_ms]})

    machine = {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "python": platform.python_version(), "grass": gs_version(),
        "compressor": os.environ.get("GRASS_COMPRESSOR", "default"),
    }
    print(f"\n{size} x {size} FCELL map ({mb:.0f} MB as float32), median of {repeat} runs; "
          f"{machine['cpus_usable']} CPUs, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| method | median | unit | runs (all) |")
    print("|---|---:|---|---|")
    for r in rows:
        fmt = "{:.0f}" if r["unit"] == "MB/s" else "{:.2f}"
        print(f"| {r['method']} | {fmt.format(r['median'])} | {r['unit']} | {r['n']} ({', '.join(fmt.format(v) for v in r['values'])}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": size, "repeat": repeat, "machine": machine, "results": rows}, indent=2))
    return 0


def gs_version() -> str:
    try:
        out = subprocess.run(["grass", "--config", "version"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
