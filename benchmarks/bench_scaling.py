"""Cost growth of the workflow's stages with the number of dates and the area (synthetic scenes).

RETIRED for new runs (2026-12-01): it measured the whole-region path, whose stages (one cube, tiles, infer and
score job for the whole region) the block path replaced; it reads those stages' benchmark TSVs, which no longer
exist. Its figures stay in docs/scaling.md as the baseline, `--from-json` still prints a saved run's tables, and
benchmarks/bench_blocks.py (which measures the block path) reuses this module's sampler and helpers.

For each cell of a grid of (optical dates, side in pixels), a fresh work folder runs the real
workflow (`snakemake -s Snakefile --directory WORK --cores 2 ...`) on the built-in synthetic scene
and reads every rule's Snakemake benchmark TSV (benchmarks/out/<study>/...): seconds and max_rss.
The number of optical dates follows from start/end at the generator's 5-day revisit
(end = start + 5 * (dates - 1) days); the actual count is read back from the cube.

Per cell:

* `snakemake --dry-run` wall time (median of --dag-repeat runs) before running (fresh folder, the
  whole DAG to plan) and after (everything requested up to date), interleaved with
  `snakemake --version` (interpreter + imports + plugin discovery, the floor of any Snakemake call);
  the difference is the DAG's own cost;
* the data stages (scene, ingest, pairing, groups, cube, main tiles: target `tiles`);
* with --stages all, on the cells the grid marks for it, the remaining stages (holdout, heldout tiles,
  train x2, predict x2, register, score: the default target) with a fixed small training budget
  (train.epochs 1: one full epoch, whose length grows with tiles x dates); reported as training
  samples/s (history.csv) and inference Mpx/s (dates x pixels / s, the predict log) besides totals.

Peak memory: the TSV's max_rss is Snakemake's psutil sample of the job's process tree, taken every
0.5 s for the first ~15 s of a job and then only every 30 s, so it can miss the peak of long jobs.
This script also samples each job's process tree itself every --sample-s seconds (jobs are told
apart by their .snakemake/scripts file) and reports both, plus the tree's CPU seconds (user + system,
waited-for GRASS modules included), which other work on a shared machine disturbs far less than wall
time (not for the torch stages, whose threads spin while they wait for a core).

The data stages of all cells run first, smallest first, then the model stages of the cells marked for
them, smallest first. Before each part (data / model stages of a cell), its cost is extrapolated per
stage from the largest measured cell not larger on either axis (time x ratio^max(1, fitted exponent):
deliberately pessimistic; peak memory x ratio^(fitted exponent, else 1)); a part whose estimate
exceeds --cell-budget seconds, whose estimated peak exceeds --mem-limit-gb, or that would end the run
after --total-budget seconds is skipped and reported with the estimate.

Grids (dates x side):

* small (default): the cross 50/100/200 dates at 256 px and 50 dates at 256/512/1024 px for the data
  stages (5 cells); all stages on 50x256, 100x256, 50x512; --total-budget 900 s by default, so it ends
  in ~15 minutes on 2 cores (the last model parts are skipped on a busy machine).
* full: all 9 cells of 50/100/200 x 256/512/1024; all stages wherever the budget allows.
* tiny: 10/20 dates x 64/128 px, a smoke test of this script (~3 minutes).

Prints Markdown tables (stage x cell: seconds, peak MB), the growth exponents per stage (least
squares on log time = a + b log dates + c log pixels; ~1 = linear) with a verdict, and --json
writes everything.

Usage::

    python benchmarks/bench_scaling.py [--grid small|full|tiny | --cells 50x256,100x256]
                                       [--stages data|all] [--json out.json] [--cell-budget 300]
                                       [--total-budget S] [--no-slurm-probe] [--workdir DIR --keep]
    python benchmarks/bench_scaling.py --from-json out.json   # print the tables again

The method and the measured results: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
BASE_CONFIG = ROOT / "config" / "config.yaml"
START = dt.date(2021, 1, 1)
OPTICAL_REVISIT_DAYS = 5  # stfuse.synthetic.make_scene's default, not exposed in the config

# stage key -> benchmark TSV under benchmarks/out/<study>/ ; order = pipeline order
STAGE_TSV = {
    "scene": "scene/scene.tsv",
    "ingest_project": "ingest/project.tsv",
    "ingest_S2": "ingest/S2.tsv",
    "ingest_S1": "ingest/S1.tsv",
    "pairing": "pairing/pairing.tsv",
    "groups": "groups/groups.tsv",
    "cube": "cube/cube.tsv",
    "tiles_main": "main/tiles.tsv",
    "holdout": "heldout/holdout.tsv",
    "tiles_heldout": "heldout/tiles.tsv",
    "train_main": "main/train.tsv",
    "train_heldout": "heldout/train.tsv",
    "infer_main": "main/infer.tsv",
    "infer_heldout": "heldout/infer.tsv",
    "register": "register/register.tsv",
    "score": "benchmark/score.tsv",
}
DATA_STAGES = list(STAGE_TSV)[:8]
MODEL_STAGES = list(STAGE_TSV)[8:]

# (dates, side): data cells, and the subset that also runs the model stages with --stages all
GRIDS = {
    "small": dict(data=[(50, 256), (100, 256), (200, 256), (50, 512), (50, 1024)],
                  model=[(50, 256), (100, 256), (50, 512)], total_budget=900.0),
    "full": dict(data=[(d, s) for d in (50, 100, 200) for s in (256, 512, 1024)],
                 model=[(d, s) for d in (50, 100, 200) for s in (256, 512, 1024)]),
    "tiny": dict(data=[(10, 64), (20, 64), (10, 128)], model=[(10, 64), (20, 64), (10, 128)]),
}
LINEAR_BAND = (0.85, 1.15)  # slope within: linear


def label(cell) -> str:
    return f"{cell[0]}d·{cell[1]}²"


def study_name(cell) -> str:
    return f"scal_d{cell[0]}_p{cell[1]}"


# --- one cell --------------------------------------------------------------------------------------------------


def write_config(work: Path, cell) -> Path:
    dates, side = cell
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["study"] = study_name(cell)
    syn = config["input"]["synthetic"]
    syn.update(width=side, height=side, start=START.isoformat(),
               end=(START + dt.timedelta(days=OPTICAL_REVISIT_DAYS * (dates - 1))).isoformat())
    config["train"]["epochs"] = 1  # fixed small budget: one (full) epoch
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_cmd(work: Path, cfg: Path, targets, *extra) -> list[str]:
    # targets before --configfile (which takes several values)
    return [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(work), "--cores", "2", *targets, *extra,
            "--configfile", str(cfg)]


def time_version() -> float:
    t0 = time.perf_counter()
    subprocess.run([str(SNAKEMAKE), "--version"], capture_output=True, check=True)
    return time.perf_counter() - t0


def dry_run(work: Path, cfg: Path, repeat: int) -> dict:
    """Median wall time of `snakemake --dry-run` (default target), the number of jobs it plans, and, interleaved,
    of `snakemake --version`: the start-up floor of any Snakemake call (interpreter, imports, plugin discovery),
    which depends on the machine's state, not on the workflow. dag_s = the difference of the medians."""
    times, version, jobs = [], [], None
    for _ in range(repeat):
        version.append(time_version())
        t0 = time.perf_counter()
        proc = subprocess.run(snakemake_cmd(work, cfg, [], "--dry-run", "--quiet", "rules"), cwd=ROOT,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"dry-run failed:\n{proc.stderr[-3000:]}")
        m = re.findall(r"^total\s+(\d+)\s*$", proc.stdout + proc.stderr, flags=re.M)
        jobs = int(m[-1]) if m else 0  # "Nothing to be done" prints no job stats
    med, ver = statistics.median(times), statistics.median(version)
    return dict(median_s=med, runs_s=times, jobs=jobs, version_median_s=ver, version_runs_s=version, dag_s=med - ver)


SCRIPT_RE = re.compile(r"\.snakemake/scripts/tmp[^/]*?\.(\w+)\.py$")


def _stage_of_script(name: str, path: str) -> str | None:
    """Stage key of a running rule script, from its name and (for shared scripts) its embedded outputs."""
    simple = {"scene": "scene", "ingest_project": "ingest_project", "pairing": "pairing", "groups": "groups",
              "cube": "cube", "holdout": "holdout", "register": "register", "score": "score"}
    if name in simple:
        return simple[name]
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    if name == "ingest_sensor":
        return "ingest_S2" if "/ingest/S2.json" in text else "ingest_S1" if "/ingest/S1.json" in text else None
    variant = {"tiles": "/{}/tiles/tiles.npy", "train": "/{}/model/model.pt", "infer": "/{}/infer/filled.npy"}
    if name in variant:
        for v in ("main", "heldout"):
            if variant[name].format(v) in text:
                return f"{name}_{v}"
    return None


class TreeSampler(threading.Thread):
    """Every `interval` s: RSS (MB) and CPU seconds of each rule job's process tree, RSS of the whole Snakemake tree.

    CPU seconds of a job = user + system of every live process of its tree plus the children_* times of the
    children they have already waited for (GRASS modules, short-lived, that a 0.5 s sampler misses); the max over
    the samples, so the last interval (<= `interval` s) of a job is lost. CPU time is far less sensitive than wall
    time to other work on a shared machine.
    """

    def __init__(self, pid: int, interval: float, classify=None):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        # classify(script name, script path) -> job key or None; the default: this script's stage keys
        self.classify = classify or _stage_of_script
        self.peaks: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.seen: dict[str, list[float]] = {}  # key -> [first, last] time.time() it was sampled alive
        self.total_peak = 0.0
        self._keys: dict[int, str | None] = {}
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()
        self.join()
        try:  # one last look (the interval may be long compared with a short run)
            self._sample()
        except Exception:
            pass

    def run(self):
        while not self._halt.is_set():
            try:
                self._sample()
            except Exception:  # a vanished process mid-sample: skip this tick
                pass
            self._halt.wait(self.interval)

    def _sample(self):
        kids: dict[int, list[int]] = {}
        for p in psutil.process_iter(["pid", "ppid"]):
            kids.setdefault(p.info["ppid"], []).append(p.info["pid"])

        def subtree(pid):
            out, todo = [], [pid]
            while todo:
                q = todo.pop()
                out.append(q)
                todo.extend(kids.get(q, []))
            return out

        info: dict[int, tuple[float, float]] = {}  # pid -> (rss MB, cpu s)
        for q in subtree(self.pid):
            try:
                proc = psutil.Process(q)
                with proc.oneshot():
                    t = proc.cpu_times()
                    info[q] = (proc.memory_info().rss / 2**20,
                               t.user + t.system + t.children_user + t.children_system)
            except psutil.Error:
                pass
        self.total_peak = max(self.total_peak, sum(v[0] for v in info.values()))
        for q in info:
            if q not in self._keys:
                try:
                    cmd = psutil.Process(q).cmdline()
                except psutil.Error:
                    continue
                match = next((SCRIPT_RE.search(a) for a in cmd if SCRIPT_RE.search(a)), None)
                self._keys[q] = self.classify(match.group(1), match.string) if match else None
            key = self._keys[q]
            if key:
                sub = [info[r] for r in subtree(q) if r in info]
                self.peaks[key] = max(self.peaks.get(key, 0.0), sum(v[0] for v in sub))
                self.cpu[key] = max(self.cpu.get(key, 0.0), sum(v[1] for v in sub))
                now = time.time()
                self.seen.setdefault(key, [now, now])[1] = now


def run_snakemake(work: Path, cfg: Path, targets, sample_s: float, timeout_s: float) -> dict:
    cmd = snakemake_cmd(work, cfg, targets, "--quiet", "all")
    log = open(work / f"snakemake_{'_'.join(targets) or 'all'}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler(proc.pid, sample_s)
    sampler.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session only
        proc.wait()
        rc = "timeout"
    wall = time.perf_counter() - t0
    sampler.stop()
    log.close()
    if rc != 0:
        tail = (work / log.name).read_text()[-3000:]
        raise RuntimeError(f"snakemake {' '.join(targets)} failed ({rc}) in {work}:\n{tail}")
    return dict(wall_s=wall, sampler_peak_mb=sampler.peaks, sampler_cpu_s=sampler.cpu, tree_peak_mb=sampler.total_peak)


def read_tsv(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    row = dict(zip(lines[0].split("\t"), lines[-1].split("\t")))

    def num(x):
        try:
            return float(x)
        except ValueError:
            return None

    return dict(s=num(row["s"]), max_rss_mb=num(row["max_rss"]), cpu_time_s=num(row.get("cpu_time", "NA")))


def model_throughput(work: Path, study: str) -> dict:
    out = {}
    for v in ("main", "heldout"):
        hist = work / "results" / study / v / "model" / "history.csv"
        if hist.is_file():
            lines = hist.read_text().splitlines()
            row = dict(zip(lines[0].split(","), lines[1].split(",")))  # epoch 1
            out[f"train_{v}_samples"] = int(row["train_samples"])
            out[f"train_{v}_samples_per_s"] = float(row["samples_per_s"])
            out[f"train_{v}_epoch_s"] = float(row["epoch_s"])
        log = work / "logs" / study / v / "infer.log"
        if log.is_file():
            m = re.findall(r"\(([\d.]+) Mpx/s\)", log.read_text())
            if m:
                out[f"infer_{v}_mpx_per_s"] = float(m[-1])
    return out


def start_cell(root: Path, cell, args) -> tuple[Path, Path, dict]:
    """Fresh work folder and config; DAG time before anything exists."""
    study = study_name(cell)
    work = root / study
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = write_config(work, cell)
    res = dict(cell=list(cell), label=label(cell), study=study, runs={}, load_avg_before=os.getloadavg())
    res["dag_fresh"] = dry_run(work, cfg, args.dag_repeat)
    return work, cfg, res


def run_part(work: Path, cfg: Path, res: dict, part: str, args) -> None:
    """Run the data stages (target `tiles`) or everything else (default target) and collect the records."""
    targets = ["tiles"] if part == "data" else []
    res["runs"][part] = run_snakemake(work, cfg, targets, args.sample_s, max(600.0, 4 * args.cell_budget))
    res["run_wall_s"] = {k: r["wall_s"] for k, r in res["runs"].items()}
    res["tree_peak_mb"] = {k: r["tree_peak_mb"] for k, r in res["runs"].items()}
    study = res["study"]
    bench = work / "benchmarks" / "out" / study
    sampled = {k: v for r in res["runs"].values() for k, v in r["sampler_peak_mb"].items()}
    cpu = {k: v for r in res["runs"].values() for k, v in r["sampler_cpu_s"].items()}
    res["stages"] = {}
    for stage, rel in STAGE_TSV.items():
        rec = read_tsv(bench / rel)
        if rec:
            rec["sampled_peak_mb"] = sampled.get(stage)
            rec["sampled_cpu_s"] = cpu.get(stage)
            res["stages"][stage] = rec
    meta = json.loads((work / "results" / study / "cube" / "cube.json").read_text())
    res["cube_shape"] = meta["shape"]
    res["dates"], res["pixels"] = meta["shape"][0], meta["shape"][2] * meta["shape"][3]
    res["cube_gb"] = float(np.prod(meta["shape"])) * 4 / 1e9
    res["throughput"] = model_throughput(work, study)
    res["load_avg_after"] = os.getloadavg()


def finish_cell(work: Path, cfg: Path, res: dict, args) -> None:
    """DAG time once everything requested is up to date; remove the work folder."""
    res["dag_done"] = dry_run(work, cfg, args.dag_repeat)
    res["dag_done"]["after"] = list(res["runs"])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


# --- growth fits and extrapolation -------------------------------------------------------------------------------


def fit_growth(points) -> dict:
    """points: [(dates, pixels, value)]. Least squares of log value on log dates and log pixels."""
    pts = [(d, p, v) for d, p, v in points if v and v > 0]
    if len(pts) < 2:
        return {}
    d = np.log([x[0] for x in pts])
    p = np.log([x[1] for x in pts])
    y = np.log([x[2] for x in pts])
    cols, names = [np.ones(len(pts))], []
    if len(set(np.round(d, 6))) > 1:
        cols.append(d)
        names.append("dates")
    if len(set(np.round(p, 6))) > 1:
        cols.append(p)
        names.append("pixels")
    if not names or len(pts) < len(cols):
        return {}
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)
    return dict(zip(names, (float(c) for c in coef[1:])))


def top_pair_slopes(points) -> dict:
    """Slope between the two largest levels of each axis, at the smallest level of the other axis: the growth
    once fixed per-job costs (interpreter, imports, GRASS session) weigh less."""
    out = {}
    for axis, other in ((0, 1), (1, 0)):
        base = min(x[other] for x in points)
        line = sorted({x[axis]: x for x in points if x[other] == base and x[2]}.values(), key=lambda x: x[axis])
        if len(line) >= 2:
            (a, b) = line[-2], line[-1]
            out["dates" if axis == 0 else "pixels"] = math.log(b[2] / a[2]) / math.log(b[axis] / a[axis])
    return out


def compute_growth(done: list[dict]) -> dict:
    growth = {}
    for stage in STAGE_TSV:
        have = [r for r in done if stage in r["stages"]]
        if len(have) < 2:
            continue

        def pts(fn):
            return [(r["dates"], r["pixels"], fn(r["stages"][stage])) for r in have]

        wall = pts(lambda x: x["s"])
        growth[stage] = dict(
            time=fit_growth(wall), time_top_pair=top_pair_slopes(wall),
            cpu=fit_growth(pts(lambda x: x.get("sampled_cpu_s"))),
            cpu_top_pair=top_pair_slopes(pts(lambda x: x.get("sampled_cpu_s"))),
            memory=fit_growth(pts(lambda x: value(x, "peak_mb"))),
            cells=[r["label"] for r in have])
        growth[stage]["verdict_dates"] = verdict(growth[stage]["time"].get("dates"))
        growth[stage]["verdict_pixels"] = verdict(growth[stage]["time"].get("pixels"))
    return growth


def verdict(slope) -> str:
    if slope is None:
        return "n/a"
    return "sub-linear" if slope < LINEAR_BAND[0] else "super-linear" if slope > LINEAR_BAND[1] else "linear"


def value(rec: dict, key: str) -> float | None:
    """A stage record's value; peak_mb = the larger of the TSV's max_rss and this script's sampled peak."""
    if key == "peak_mb":
        return max(filter(None, [rec.get("max_rss_mb"), rec.get("sampled_peak_mb")]), default=None)
    return rec.get(key)


def estimate(stage: str, cell, done: list[dict], key: str) -> float | None:
    """Pessimistic extrapolation of `key` (s or memory) of `stage` to `cell` from the measured cells."""
    have = [r for r in done if stage in r["stages"] and value(r["stages"][stage], key)]
    if not have:
        return None
    target = (cell[0], cell[1] ** 2)
    below = [r for r in have if r["cell"][0] <= cell[0] and r["cell"][1] <= cell[1]] or have
    ref = max(below, key=lambda r: r["cell"][0] * r["cell"][1] ** 2)
    fit = fit_growth([(r["cell"][0], r["cell"][1] ** 2, value(r["stages"][stage], key)) for r in have])
    # time: never below linear (fixed costs flatten small cells); memory: the fitted exponent where there is one
    # (most jobs hold a constant few hundred MB of interpreter + GRASS), else linear
    low = 1.0 if key == "s" else 0.0
    e_d = min(2.0, max(low, fit.get("dates", 1.0)))
    e_p = min(2.0, max(low, fit.get("pixels", 1.0)))
    ratio_d, ratio_p = target[0] / ref["cell"][0], target[1] / ref["cell"][1] ** 2
    return value(ref["stages"][stage], key) * ratio_d ** e_d * ratio_p ** e_p


def estimate_part(stages, cell, done) -> tuple[float | None, float | None]:
    times = [estimate(s, cell, done, "s") for s in stages]
    mems = [estimate(s, cell, done, "peak_mb") for s in stages]
    if any(t is None for t in times):
        return None, None
    return sum(times), max((m for m in mems if m), default=None)


# --- report -----------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(),
                ram_gb=round(psutil.virtual_memory().total / 2**30, 1),
                python=platform.python_version(), platform=platform.platform())


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}" if x < 100 else f"{x:.0f}"


def markdown(result) -> str:
    cells = result["cells"]
    ran = [c for c in cells if "stages" in c]
    lines = []
    head = "| stage | " + " | ".join(c["label"] for c in cells) + " |"
    sep = "| --- |" + " ---: |" * len(cells)

    def stage_table(title, getter, total=None):
        lines.extend([f"\n{title}\n", head, sep])
        for stage in STAGE_TSV:
            if not any(stage in c.get("stages", {}) for c in cells) and not any(
                    stage in c.get("skipped_est", {}) for c in cells):
                continue
            row = []
            for c in cells:
                if stage in c.get("stages", {}):
                    row.append(fmt((getter or (lambda r: r["s"]))(c["stages"][stage])))
                elif stage in c.get("skipped_est", {}):
                    est = c["skipped_est"][stage] if getter is None else None
                    row.append(f"skip (~{fmt(est)})" if est is not None else "skip")
                else:
                    row.append("–")
            lines.append(f"| {stage} | " + " | ".join(row) + " |")
        if total:
            for name, fn in total:
                lines.append(f"| **{name}** | " + " | ".join(fmt(fn(c)) if "stages" in c else "skip" for c in cells)
                             + " |")

    def stage_sum(c, stages):
        vals = [c["stages"][s]["s"] for s in stages if s in c["stages"]]
        return sum(vals) if vals else None

    stage_table("Seconds per stage (Snakemake benchmark TSV, column s; skip (~estimate))", None, total=[
        ("sum data stages", lambda c: stage_sum(c, DATA_STAGES)),
        ("sum model stages", lambda c: stage_sum(c, MODEL_STAGES)),
        ("snakemake wall, all runs", lambda c: sum(c["run_wall_s"].values())),
    ])
    stage_table("Peak RSS MB (Snakemake benchmark TSV, max_rss; sampled 0.5 s for ~15 s, then every 30 s)",
                lambda r: r["max_rss_mb"])
    stage_table(f"Peak RSS MB (this script's sampler, every {result['args']['sample_s']} s, job process tree)",
                lambda r: r.get("sampled_peak_mb"))
    stage_table(f"CPU seconds per stage (this script's sampler: user + system of the job's process tree, "
                "waited-for children included)", lambda r: r.get("sampled_cpu_s"))

    lines.extend(["\nCells: actual dates x pixels, cube size, DAG (snakemake --dry-run, default target, median of "
                  f"{result['args']['dag_repeat']}, interleaved with `snakemake --version`, whose start-up cost is "
                  f"the floor of any call; {result['snakemake_version_s']:.2f} s at the start of the run)\n",
                  "| cell | dates | pixels | cube GB | jobs planned (fresh) | dry-run fresh s | dry-run after s "
                  "| --version s fresh, after | DAG s fresh, after (dry-run − version) "
                  "| run wall s | Snakemake tree peak MB | dominant stage | load avg 1 min before, after |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"])
    for c in ran:
        tot = sum(v["s"] for v in c["stages"].values())
        dom = max(c["stages"].items(), key=lambda kv: kv[1]["s"])
        lines.append(f"| {c['label']} | {c['dates']} | {c['pixels']:,} | {c['cube_gb']:.2f} | {c['dag_fresh']['jobs']} "
                     f"| {c['dag_fresh']['median_s']:.2f} | {c['dag_done']['median_s']:.2f} "
                     f"| {fmt(c['dag_fresh'].get('version_median_s'), 2)}, "
                     f"{fmt(c['dag_done'].get('version_median_s'), 2)} "
                     f"| {fmt(c['dag_fresh'].get('dag_s'), 2)}, {fmt(c['dag_done'].get('dag_s'), 2)} "
                     f"| {sum(c['run_wall_s'].values()):.0f} | {max(c['tree_peak_mb'].values()):.0f} "
                     f"| {dom[0]} ({100 * dom[1]['s'] / tot:.0f} %) "
                     f"| {c['load_avg_before'][0]:.1f}, {c['load_avg_after'][0]:.1f} |")

    thr = [c for c in ran if c["throughput"]]
    if thr:
        lines.extend(["\nModel stages with train.epochs 1 (one full epoch; samples = tiles x usable dates)\n",
                      "| cell | train samples (main) | train samples/s main | heldout | epoch s (main) "
                      "| infer Mpx/s main | heldout | predict rule Mpx/s (end to end, main) |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"])
        for c in thr:
            t = c["throughput"]
            e2e = (c["dates"] * c["pixels"] / 1e6 / c["stages"]["infer_main"]["s"]
                   if "infer_main" in c["stages"] else None)
            lines.append(f"| {c['label']} | {t.get('train_main_samples', '–')} "
                         f"| {fmt(t.get('train_main_samples_per_s'))} "
                         f"| {fmt(t.get('train_heldout_samples_per_s'))} | {fmt(t.get('train_main_epoch_s'))} "
                         f"| {fmt(t.get('infer_main_mpx_per_s'), 2)} | {fmt(t.get('infer_heldout_mpx_per_s'), 2)} "
                         f"| {fmt(e2e, 2)} |")

    lines.extend([f"\nGrowth exponents: least squares on log y = a + b log dates + c log pixels over the cells "
                  f"measured (b, c ~1: linear; verdict linear for {LINEAR_BAND[0]}..{LINEAR_BAND[1]}). wall = TSV "
                  "seconds, cpu = sampled CPU seconds of the job's tree (less sensitive to other load, except for the "
                  "torch stages whose threads spin while waiting), top pair = wall / cpu slope between the two largest "
                  "levels of that axis (fixed per-job costs weigh less)\n",
                  "| stage | wall vs dates | cpu | top pair | verdict (dates) | wall vs pixels | cpu | top pair "
                  "| verdict (pixels) | peak MB vs dates | vs pixels |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"])
    for stage, g in result["growth"].items():
        t, c, tp, ctp, m = g["time"], g.get("cpu", {}), g["time_top_pair"], g.get("cpu_top_pair", {}), g["memory"]
        row = [stage]
        for axis in ("dates", "pixels"):
            v = verdict(t.get(axis))
            if c.get(axis) is not None and verdict(c.get(axis)) != v:
                v += f" (cpu: {verdict(c.get(axis))})"
            row += [fmt(t.get(axis), 2), fmt(c.get(axis), 2), f"{fmt(tp.get(axis), 2)} / {fmt(ctp.get(axis), 2)}", v]
        row += [fmt(m.get("dates"), 2), fmt(m.get("pixels"), 2)]
        lines.append("| " + " | ".join(row) + " |")

    skipped = [c for c in cells if c.get("skipped")]
    if skipped:
        lines.append("\nSkipped (estimates extrapolated from smaller cells, pessimistic)\n")
        for c in cells:
            for part, why in c.get("skipped", {}).items():
                lines.append(f"- {c['label']} {part} stages: {why}")

    rest = [c for c in GRIDS["full"]["data"] if list(c) not in [r["cell"] for r in ran]]
    if ran and rest and min(c["cell"][1] for c in ran) >= 256:
        lines.extend(["\nExtrapolated to the full-grid cells not measured (time: measured x ratio^max(1, fitted "
                      "exponent), pessimistic; peak: x ratio^fitted exponent)\n",
                      "| cell | cube GB | data stages s | data peak GB | largest data stage | model stages s "
                      "| model peak GB | largest model stage |",
                      "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"])
        for cell in sorted(rest, key=lambda c: c[0] * c[1] ** 2):
            row = [label(cell), f"{cell[0] * 7 * cell[1] ** 2 * 4 / 1e9:.2f}"]
            for stages in (DATA_STAGES, MODEL_STAGES):
                t, mb = estimate_part(stages, cell, ran)
                per = {st: estimate(st, cell, ran, "s") for st in stages}
                per = {k: v for k, v in per.items() if v is not None}
                big = max(per.items(), key=lambda kv: kv[1]) if per else None
                row += [fmt(t), fmt(mb / 1024 if mb else None), f"{big[0]} (~{fmt(big[1])} s)" if big else "–"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(result) -> str:
    result = dict(result, growth=compute_growth([c for c in result["cells"] if "stages" in c]))
    m, a = result["machine"], result["args"]
    return (f"\n# stfuse cost growth ({a['grid']} grid, --stages {a['stages']})\n\n{result['date']}; {m['cpu']}, "
            f"{m['cores']} cores, {m['ram_gb']} GiB RAM; total {result['total_s'] / 60:.1f} min"
            + (f"; `scontrol show config` took {result['scontrol_probe_s']:.1f} s"
               + (" (stubbed for the Snakemake calls: --no-slurm-probe)" if a.get("no_slurm_probe") else "")
               if result.get("scontrol_probe_s") is not None else "") + "\n" + markdown(result))


# --- main -------------------------------------------------------------------------------------------------------


def slurm_probe(root: Path, stub: bool) -> float | None:
    """Seconds `scontrol show config` takes here (None without Slurm); with ``stub``, a failing `scontrol`
    goes first on this process's PATH, so the Snakemake calls it starts skip the plugin's ~9 s probe."""
    probe_s = None
    if shutil.which("scontrol"):
        t0 = time.perf_counter()
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=60)
        probe_s = time.perf_counter() - t0
    if stub:
        shim = root / "no_slurm_probe"
        shim.mkdir(exist_ok=True)
        (shim / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (shim / "scontrol").chmod(0o755)
        os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
    return probe_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-json", help="print the tables of a saved --json result and exit (runs nothing)")
    args = ap.parse_args()
    if args.from_json:
        print(report(json.loads(Path(args.from_json).read_text())))
        return
    raise SystemExit("bench_scaling.py measured the whole-region path, which the block path replaced on 2026-12-01: "
                     "its stages' benchmark files no longer exist. Measure with benchmarks/bench_blocks.py; "
                     "--from-json FILE prints the tables of a saved run.")


if __name__ == "__main__":
    main()
