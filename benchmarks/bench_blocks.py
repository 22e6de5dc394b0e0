"""Cost of the block path: every pixel stage one Snakemake job per spatial block (synthetic scenes).

For each cell (optical dates x side^2 pixels; 50 x 512^2, 1024^2, 2048^2 by default) a fresh work folder runs
the real workflow end to end (default target: `snakemake -s Snakefile --directory WORK --cores 2`) on the
built-in synthetic scene, with the same `blocks.size` for every cell (default 256: the three sides are then
exactly 4 / 16 / 64 equal blocks, and the halo's share of a block read, (256 + 2*32)^2 / 256^2, is the same
as s2tile's (512 + 2*64)^2 / 512^2), `tiles.size` 32 (halo = tiles.size), `train.epochs` 1 with
`train.samples_per_epoch` fixed (2000) so that training costs the same in every cell, inference at its
defaults. The number of optical dates follows from start/end at the generator's 5-day revisit, as in
bench_scaling.py.

Measured per job (= per rule and block / variant / sensor): seconds (the job's benchmark TSV, column s), start
and end (the TSV's mtime - s, mtime), peak RSS of the job's process tree sampled by this script every
--sample-s s (bench_scaling.TreeSampler; Snakemake's own max_rss, also kept, misses the peaks of long jobs),
and the tree's CPU seconds. Jobs are told apart by the log path embedded in their .snakemake/scripts file,
which mirrors the benchmark TSV's path (logs/<study>/X.log <-> benchmarks/out/<study>/X.tsv).

Per cell and stage (a stage = a rule): jobs, sum of seconds, wall span (the union of its jobs' intervals),
max and median job seconds, max and median job peak, the largest job's peak overall. Then:

* the ratio largest-job-peak(largest cell) / largest-job-peak(smallest cell) (target <= 1.2);
* growth exponents vs cells (log-log least squares over the sides; dates are fixed) of every stage, of the
  sum of the block stages (cube_block, tiles_block, predict_block, score_stats_block, score_block; target
  0.9-1.1) and of the data stages;
* cores: on one cell (--cores-side, default 1024) the block stages again, forced, from the finished upstream
  (`--forcerun <block rules> --allowed-rules <block rules>`, targets = every block job's output), with
  --cores 1 and --cores 2: the speedup of their wall time (target >= 1.6x). --pin also limits each run's
  processes to that many CPUs (sched_setaffinity); without it --cores limits only Snakemake's scheduling
  (a torch job with 2 threads uses 2 cores under --cores 1 as well);
* data-stage cost per cell-date (ns) against the old whole-region path's figures in docs/scaling.md;
* per-block costs of the block stages at the largest cell, extrapolated to config/studies/s2tile.yaml
  (10980^2 cells, 100 dates, blocks.size 512, tiles.size 64): per-block seconds x (read cells x dates) ratio,
  the job-seconds of every stage, the wall time and memory on this machine and on a cluster of --nodes nodes
  x --cores-per-node cores (one block job per `threads` cores of its rule).

Disk: a cell's work folder holds everything it writes until the cell ends (~300-400 bytes per cell-date:
block cubes with their halo, both variants' tiles and predictions, GRASS maps); before each cell after the
first, its need is extrapolated from the previous cell and the cell is skipped when it exceeds the free space
(--ignore-disk to try anyway). Work folders are removed after each cell unless --keep.

Prints Markdown tables, with the machine, date and exact command at the top; --json writes everything (also
after each cell, so a partial run keeps its cells); --from-json prints the tables of a saved run again.

Usage::

    .venv/bin/python benchmarks/bench_blocks.py --no-slurm-probe --json blocks.json
        [--sides 512,1024,2048] [--dates 50] [--block-size 256] [--tile-size 32] [--samples-per-epoch 2000]
        [--cores 2] [--cores-side 1024 | --no-cores-test] [--cores-compare 1,2] [--cores-repeats 3] [--pin]
        [--predict-threads N]
        [--targets register] [--nodes 10 --cores-per-node 16] [--workdir DIR --keep] [--ignore-disk]
        [--sample-s 0.2]
    .venv/bin/python benchmarks/bench_blocks.py --smoke          # 10 dates x 64^2, 128^2, blocks.size 64
    .venv/bin/python benchmarks/bench_blocks.py --from-json blocks.json

The method and results: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scaling as bs  # noqa: E402  (TreeSampler, read_tsv, machine, fmt, time_version)

ROOT = bs.ROOT
SNAKEFILE = bs.SNAKEFILE
SNAKEMAKE = bs.SNAKEMAKE
BASE_CONFIG = bs.BASE_CONFIG
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
S2TILE = ROOT / "config" / "studies" / "s2tile.yaml"
START = bs.START
REVISIT = bs.OPTICAL_REVISIT_DAYS

B = r"(?P<block>r\d{4}c\d{4})"
V = r"(?P<variant>main|heldout)"
# a job's path under benchmarks/out/<study>/ (without .tsv) = under logs/<study>/ (without .log) -> its rule;
# first match wins (ingest/project before ingest/<sensor>)
JOB_PATTERNS = [
    (r"scene/scene", "scene"),
    (r"ingest/project", "ingest_project"),
    (r"ingest/(?P<sensor>[^/]+)", "ingest_sensor"),
    (r"pairing/pairing", "pairing"),
    (r"groups/groups", "groups"),
    (rf"blocks/{B}/cube", "cube_block"),
    (r"heldout/holdout", "holdout"),
    (rf"{V}/blocks/{B}/tiles", "tiles_block"),
    (rf"{V}/tile_store", "tile_store"),
    (rf"{V}/train", "train_model"),
    (rf"{V}/blocks/{B}/infer", "predict_block"),
    (r"register/register", "register_filled"),
    (rf"benchmark/blocks/{B}/score_stats", "score_stats_block"),
    (rf"benchmark/blocks/{B}/score", "score_block"),
    (r"benchmark/score", "score"),
]
STAGES = list(dict.fromkeys(rule for _, rule in JOB_PATTERNS))  # pipeline order, each rule once
BLOCK_STAGES = ["cube_block", "tiles_block", "predict_block", "score_stats_block", "score_block"]
DATA_STAGES = ["scene", "ingest_project", "ingest_sensor", "pairing", "groups", "cube_block", "tiles_block",
               "tile_store"]
# the step module each block rule's script imports: its import floor (interpreter + imports) in time and memory
STEP_MODULES = {"cube_block": "stfuse.steps.cube", "tiles_block": "stfuse.steps.tiles",
                "predict_block": "stfuse.steps.predict", "score_stats_block": "stfuse.steps.score",
                "score_block": "stfuse.steps.score"}
PEAK_TARGET = 1.2
EXPONENT_BAND = (0.9, 1.1)
SPEEDUP_TARGET = 1.6

# The old whole-region path (one job per stage), docs/scaling.md "Results": seconds (TSV) and CPU seconds
# (sampler) of the stages compared per cell-date. Run A = the small grid, run B = the quiet re-run.
OLD_PATH = {
    "A 50d·512²": dict(dates=50, side=512,
                       s=dict(ingest=1.7 + 18.5 + 9.2, cube=4.5, tiles_main=3.9),
                       cpu=dict(ingest=1.5 + 13.3 + 4.4, cube=5.3, tiles_main=3.6)),
    "B 50d·512²": dict(dates=50, side=512,
                       s=dict(ingest=1.3 + 12.2 + 4.7, cube=4.7, tiles_main=3.8, predict_main=19.1, score=75.5),
                       cpu=dict(ingest=1.1 + 13.0 + 4.0, cube=6.1, tiles_main=3.5, predict_main=30.7,
                                score=75.0)),
    "A 50d·1024²": dict(dates=50, side=1024,
                        s=dict(ingest=2.9 + 47.1 + 19.7, cube=20.5, tiles_main=24.2),
                        cpu=dict(ingest=1.1 + 29.7 + 7.1, cube=16.4, tiles_main=15.1)),
}
# compared quantity -> (rules, variant or None) of the new path
PER_CELL_DATE = {
    "ingest": (["ingest_project", "ingest_sensor"], None),
    "cube": (["cube_block"], None),
    "tiles_main": (["tiles_block", "tile_store"], "main"),
    "predict_main": (["predict_block"], "main"),
    "score": (["score_stats_block", "score_block", "score"], None),
}
PER_CELL_DATE_LABEL = {"ingest": "ingest (project + S2 + S1)", "cube": "cube (cube_block)",
                       "tiles_main": "tiles, main (tiles_block + tile_store)", "predict_main": "predict, main",
                       "score": "score (score_stats_block + score_block + score)"}

fmt = bs.fmt


def label(dates, side) -> str:
    return f"{dates}d·{side}²"


def study_name(dates, side) -> str:
    return f"blk_d{dates}_p{side}"


def job_of(rel: str) -> dict | None:
    for pattern, rule in JOB_PATTERNS:
        m = re.fullmatch(pattern, rel)
        if m:
            return dict(rule=rule, **{k: v for k, v in m.groupdict().items() if v})
    return None


def schema_has(section: str, key: str) -> bool:
    schema = yaml.safe_load(SCHEMA.read_text())
    return key in schema["properties"].get(section, {}).get("properties", {})


def rule_threads() -> dict:
    """`threads:` of every rule in workflow/rules/*.smk (scheduling: one job per `threads` cores)."""
    out = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            m = re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", line)
            if m:
                rule = m.group(1)
            m = re.match(r"\s+threads:\s*(\d+)", line)
            if m and rule:
                out[rule] = int(m.group(1))
    return out


# --- one cell ---------------------------------------------------------------------------------------------------


def write_config(work: Path, dates: int, side: int, args) -> Path:
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["study"] = study_name(dates, side)
    config["input"]["synthetic"].update(
        width=side, height=side, start=START.isoformat(),
        end=(START + dt.timedelta(days=REVISIT * (dates - 1))).isoformat())
    config["tiles"]["size"] = args.tile_size
    config["blocks"] = {"size": args.block_size}
    config["train"]["epochs"] = 1
    if args.samples_per_epoch_applied:
        config["train"]["samples_per_epoch"] = args.samples_per_epoch
    if args.predict_threads:
        config["infer"]["threads"] = args.predict_threads
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_cmd(work: Path, cfg: Path, targets, cores: int, *extra) -> list[str]:
    # targets before --configfile (which takes several values)
    return [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(work), "--cores", str(cores), *targets,
            *extra, "--configfile", str(cfg)]


def dry_run(work: Path, cfg: Path, cores: int, targets=()) -> dict:
    """Wall time of `snakemake --dry-run` (default target) and the jobs it plans per rule (the holdout checkpoint
    hides score's per-block jobs until it has run)."""
    t0 = time.perf_counter()
    proc = subprocess.run(snakemake_cmd(work, cfg, list(targets), cores, "--dry-run", "--quiet", "rules"), cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dry-run failed:\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    jobs = {}
    if "Job stats:" in text:
        for line in text.split("Job stats:", 1)[1].splitlines()[3:]:
            m = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
            if not m:
                break
            if m.group(1) not in ("all", "total"):
                jobs[m.group(1)] = int(m.group(2))
    return dict(s=wall, jobs=jobs)


def classifier(study: str):
    """Job key (its path under logs/<study>/, without .log) of a running rule script."""
    log_re = re.compile(rf"logs/{re.escape(study)}/([\w./-]+?)\.log")

    def classify(_name: str, path: str) -> str | None:
        try:
            m = log_re.search(Path(path).read_text(errors="replace"))
        except OSError:
            return None
        return m.group(1) if m else None

    return classify


def run_snakemake(work: Path, cfg: Path, study: str, targets, cores: int, extra, args, tag: str,
                  cpus: set | None = None) -> dict:
    # not --quiet all: that hides the error messages as well
    if args.predict_threads:
        extra = [*extra, "--set-threads", f"predict_block={args.predict_threads}"]
    cmd = snakemake_cmd(work, cfg, targets, cores, "--quiet", "host", "progress", "reason", "rules", *extra)
    log_path = work / f"snakemake_{tag}.log"
    log = open(log_path, "w")
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    t0, e0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=preexec)
    sampler = bs.TreeSampler(proc.pid, args.sample_s, classify=classifier(study))
    sampler.start()
    try:
        rc = proc.wait(timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session only
        proc.wait()
        rc = "timeout"
    wall = time.perf_counter() - t0
    sampler.stop()
    log.close()
    if rc != 0:
        text = log_path.read_text()
        err = text[text.find("Error"):] if "Error" in text else text
        raise RuntimeError(f"snakemake ({tag}) failed ({rc}) in {work}:\n{err[-3000:]}")
    return dict(wall_s=wall, start=e0, end=time.time(), cores=cores, cpus=sorted(cpus) if cpus else None,
                peaks=sampler.peaks, cpu=sampler.cpu, seen=sampler.seen, tree_peak_mb=sampler.total_peak)


def collect_jobs(work: Path, study: str, run: dict, since: float | None = None) -> tuple[dict, list[str]]:
    """Every job's record from its benchmark TSV and this script's samples; TSVs older than `since` skipped.
    Returns (jobs by key, TSVs whose path no pattern knows)."""
    bench = work / "benchmarks" / "out" / study
    jobs, unknown = {}, []
    for tsv in sorted(bench.rglob("*.tsv")):
        rel = tsv.relative_to(bench).with_suffix("").as_posix()
        mtime = tsv.stat().st_mtime
        if since is not None and mtime < since:
            continue
        info = job_of(rel)
        if info is None:
            unknown.append(rel)
            continue
        rec = bs.read_tsv(tsv) or {}
        s = rec.get("s") or 0.0
        peak = max(filter(None, [rec.get("max_rss_mb"), run["peaks"].get(rel)]), default=None)
        jobs[rel] = dict(info, s=s, start=mtime - s, end=mtime, tsv_max_rss_mb=rec.get("max_rss_mb"),
                         sampled_peak_mb=run["peaks"].get(rel), peak_mb=peak, cpu_s=run["cpu"].get(rel),
                         tsv_cpu_s=rec.get("cpu_time_s"))
    return jobs, unknown


def union_length(intervals) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(jobs: dict, rules=None, variant=None) -> dict:
    """Per rule: jobs, sum / wall span / max / median of seconds, max / median peak, CPU seconds."""
    out = {}
    for rule in rules or STAGES:
        js = {k: j for k, j in jobs.items() if j["rule"] == rule and (variant is None or j.get("variant") == variant)}
        if not js:
            continue
        secs = [j["s"] for j in js.values()]
        peaks = {k: j["peak_mb"] for k, j in js.items() if j["peak_mb"]}
        cpus = [j["cpu_s"] for j in js.values() if j["cpu_s"] is not None]
        top = max(peaks, key=peaks.get) if peaks else None
        out[rule] = dict(jobs=len(js), sum_s=sum(secs), span_s=union_length([(j["start"], j["end"]) for j in js.values()]),
                         first_start=min(j["start"] for j in js.values()), last_end=max(j["end"] for j in js.values()),
                         max_s=max(secs), median_s=statistics.median(secs),
                         peak_max_mb=peaks[top] if top else None,
                         peak_median_mb=statistics.median(peaks.values()) if peaks else None,
                         peak_job=top, cpu_sum_s=sum(cpus) if cpus else None)
    return out


def tree_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) under path."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def block_plan(side: int, block_size: int, tile_size: int) -> dict:
    from stfuse import blocks

    plan = blocks.study_plan({"rows": side, "cols": side}, {"size": block_size}, tile_size)
    return {b.id: dict(read_cells=b.read_rows * b.read_cols, core_cells=b.rows * b.cols) for b in plan}


def train_history(work: Path, study: str) -> dict:
    out = {}
    for v in ("main", "heldout"):
        hist = work / "results" / study / v / "model" / "history.csv"
        if hist.is_file():
            lines = hist.read_text().splitlines()
            row = dict(zip(lines[0].split(","), lines[1].split(",")))  # epoch 1
            out[v] = {k: float(row[k]) for k in ("train_samples", "samples_per_s", "epoch_s") if k in row}
    return out


def model_macs(work: Path, study: str, s2tile: dict) -> dict | None:
    """Multiply-accumulates per output pixel of the measured model and of s2tile's (same in/out channels), from
    forward hooks on every convolution (64^2 input): the factor the model's size adds to predict and train."""
    ckpt_path = work / "results" / study / "main" / "model" / "model.pt"
    if not ckpt_path.is_file():
        return None
    import torch

    from stfuse.models import build_model

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)

    def macs(name, params, size=64):
        net = build_model(name, ckpt["in_channels"], ckpt["out_channels"], **dict(params)).eval()
        total = [0]

        def hook(mod, _inp, out):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out.numel() * k

        hs = [m.register_forward_hook(hook) for m in net.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        with torch.no_grad():
            net(torch.zeros(1, ckpt["in_channels"], size, size))
        for h in hs:
            h.remove()
        return total[0] / size ** 2

    tr = s2tile["cfg"].get("train", {})
    measured = macs(ckpt["model"], ckpt.get("model_params") or {})
    target = macs(tr.get("model", "unet"), tr.get("model_params") or {})
    return dict(measured_per_px=measured, s2tile_per_px=target, ratio=target / measured,
                measured_model=[ckpt["model"], ckpt.get("model_params")], s2tile_model=[tr.get("model", "unet"),
                                                                                          tr.get("model_params")])


def block_outputs(work: Path) -> list[str]:
    """One output file of every block job that ran, from Snakemake's own records (.snakemake/metadata: one JSON
    per output file, named by its urlsafe-base64 path, split into folders when long, holding its rule and log)."""
    per_job = {}
    meta = work / ".snakemake" / "metadata"
    for f in sorted(meta.rglob("*")):
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
            name = base64.urlsafe_b64decode("".join(f.relative_to(meta).parts)).decode()
        except (ValueError, OSError):
            continue
        if rec.get("rule") in BLOCK_STAGES and (work / name).exists():
            per_job.setdefault(tuple(rec.get("log") or [name]), name)
    return sorted(per_job.values())


def cores_test(work: Path, cfg: Path, study: str, args) -> dict:
    """The block stages again from the finished upstream, forced, with each of --cores-compare, --cores-repeats
    times (the settings alternate within each repeat, so drifting load hits them alike). ``runs[n]`` is the repeat
    with the median block wall time; ``repeats[n]`` every repeat's."""
    targets = block_outputs(work)
    rules = list(BLOCK_STAGES)
    extra = ["--forcerun", *rules, "--allowed-rules", *rules]
    avail = sorted(os.sched_getaffinity(0))
    out = dict(targets=len(targets), pinned=args.pin, runs={}, repeats={str(n): [] for n in args.cores_compare})
    for r in range(args.cores_repeats):
        for n in args.cores_compare if r % 2 == 0 else args.cores_compare[::-1]:
            cpus = set(avail[:n]) if args.pin else None
            print(f"  [cores test {r + 1}/{args.cores_repeats}] block stages with --cores {n}"
                  f"{' (pinned to CPUs %s)' % sorted(cpus) if cpus else ''} ...", file=sys.stderr, flush=True)
            run = run_snakemake(work, cfg, study, targets, n, extra, args, f"cores{n}", cpus=cpus)
            jobs, _ = collect_jobs(work, study, run, since=run["start"] - 1)
            blockjobs = {k: j for k, j in jobs.items() if j["rule"] in BLOCK_STAGES}
            out["repeats"][str(n)].append(dict(
                wall_s=run["wall_s"], jobs=len(blockjobs),
                block_wall_s=union_length([(j["start"], j["end"]) for j in blockjobs.values()]),
                block_span_s=(max(j["end"] for j in blockjobs.values()) - min(j["start"] for j in blockjobs.values()))
                if blockjobs else None,
                stages=summarize(blockjobs, BLOCK_STAGES), tree_peak_mb=run["tree_peak_mb"],
                load_avg_after=os.getloadavg()))
            print(f"  [cores test] --cores {n}: {run['wall_s']:.0f} s, {len(blockjobs)} block jobs", file=sys.stderr,
                  flush=True)
    for n, reps in out["repeats"].items():
        out["runs"][n] = sorted(reps, key=lambda x: x["block_wall_s"])[(len(reps) - 1) // 2]  # odd counts: the median
    return out


def run_cell(root: Path, dates: int, side: int, args, *, cores_test_here: bool, largest: bool,
             s2tile: dict) -> dict:
    study = study_name(dates, side)
    work = root / study
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = write_config(work, dates, side, args)
    res = dict(label=label(dates, side), study=study, side=side, dates_requested=dates, pixels=side * side,
               load_avg_before=os.getloadavg())
    res["dry_run"] = dry_run(work, cfg, args.cores, args.targets)
    run = run_snakemake(work, cfg, study, args.targets, args.cores, [], args, "all")
    res["run"] = {k: run[k] for k in ("wall_s", "start", "end", "cores", "tree_peak_mb")}
    jobs, unknown = collect_jobs(work, study, run)
    res["jobs"], res["unknown_tsv"] = jobs, unknown
    res["stages"] = summarize(jobs)
    res["stages_by_variant"] = {v: summarize(jobs, ["tiles_block", "tile_store", "train_model", "predict_block"], v)
                                for v in ("main", "heldout")}
    res["block_wall_s"] = union_length([(j["start"], j["end"]) for j in jobs.values() if j["rule"] in BLOCK_STAGES])
    meta_path = next(iter(sorted((work / "results" / study / "blocks").glob("*/cube/cube.json"))), None)
    meta = json.loads(meta_path.read_text()) if meta_path else {}
    shape = meta.get("shape") or [dates, None]
    res["dates"], res["channels"] = shape[0], shape[1]
    plan = block_plan(side, args.block_size, args.tile_size)
    res["blocks"] = len(plan)
    res["read_cells"] = sum(b["read_cells"] for b in plan.values())
    res["block_cells"] = {k: v["read_cells"] for k, v in plan.items()}
    holdout = work / "results" / study / "heldout" / "holdout.json"
    res["benchmark_possible"] = json.loads(holdout.read_text()).get("possible") if holdout.is_file() else None
    res["train"] = train_history(work, study)
    res["disk_bytes"] = {d: tree_bytes(work / d / study) for d in ("results", "benchmarks/out", "logs")}
    if largest:
        try:
            res["macs"] = model_macs(work, study, s2tile)
        except Exception as err:  # an estimate only: never lose the cell for it
            res["macs"] = None
            print(f"[{res['label']}] model MACs not computed: {err}", file=sys.stderr, flush=True)
    res["load_avg_after"] = os.getloadavg()
    if cores_test_here:
        res["cores_test"] = cores_test(work, cfg, study, args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def import_floor(module: str) -> dict:
    """Wall time and peak RSS of a fresh interpreter importing `module` (what every job of a rule pays)."""
    code = (f"import resource, time; t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    _imp, kb = proc.stdout.split()
    return dict(s=wall, peak_mb=int(kb) / 1024)


# --- analysis ---------------------------------------------------------------------------------------------------


def slope(xs, ys) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def stage_sum(cell, rules, key="sum_s") -> float | None:
    vals = [cell["stages"][r][key] for r in rules if r in cell["stages"] and cell["stages"][r][key] is not None]
    return sum(vals) if vals else None


def growth(cells) -> dict:
    """Exponents vs cells (side^2) of each stage's summed seconds, CPU seconds and max peak."""
    xs = [c["pixels"] for c in cells]
    out = {}
    for rule in STAGES:
        if not any(rule in c["stages"] for c in cells):
            continue

        def vals(key):
            return [c["stages"].get(rule, {}).get(key) for c in cells]

        out[rule] = dict(time=slope(xs, vals("sum_s")), cpu=slope(xs, vals("cpu_sum_s")),
                         time_top=slope(xs[-2:], vals("sum_s")[-2:]), peak=slope(xs, vals("peak_max_mb")))
    for name, rules in (("sum of the block stages", BLOCK_STAGES), ("sum of the data stages", DATA_STAGES)):
        t = [stage_sum(c, rules) for c in cells]
        cp = [stage_sum(c, rules, "cpu_sum_s") for c in cells]
        out[name] = dict(time=slope(xs, t), cpu=slope(xs, cp), time_top=slope(xs[-2:], t[-2:]), peak=None)
    w = [c["block_wall_s"] for c in cells]
    out["block stages' wall (union)"] = dict(time=slope(xs, w), cpu=None, time_top=slope(xs[-2:], w[-2:]), peak=None)
    return out


def largest_peak(cell) -> tuple[str | None, float | None]:
    best = max(((k, j["peak_mb"]) for k, j in cell["jobs"].items() if j["peak_mb"]), key=lambda kv: kv[1],
               default=(None, None))
    return best


def s2tile_spec() -> dict:
    cfg = yaml.safe_load(S2TILE.read_text())
    syn = cfg["input"]["synthetic"]
    d0, d1 = (dt.date.fromisoformat(str(syn[k])[:10]) for k in ("start", "end"))
    dates = (d1 - d0).days // REVISIT + 1
    tile = cfg.get("tiles", {}).get("size", 32)
    size = cfg.get("blocks", {}).get("size", 384)
    from stfuse import blocks

    plan = blocks.study_plan({"rows": syn["height"], "cols": syn["width"]}, cfg.get("blocks"), tile)
    interior = max(b.read_rows * b.read_cols for b in plan)
    return dict(cfg=cfg, width=syn["width"], height=syn["height"], dates=dates, tile_size=tile, block_size=size,
                blocks=len(plan), read_cells=sum(b.read_rows * b.read_cols for b in plan),
                block_read_cells=[b.read_rows * b.read_cols for b in plan], interior_read_cells=interior,
                halo=blocks.halo_for(cfg.get("blocks"), tile))


def extrapolate(result: dict) -> dict | None:
    """s2tile from the largest measured cell: block stages per block (seconds x read-cells x dates ratio), the
    other stages by their fitted growth; wall and memory here and on the cluster."""
    cells = [c for c in result["cells"] if "stages" in c]
    if not cells:
        return None
    big = max(cells, key=lambda c: c["pixels"])
    sp = result["s2tile"]
    a = result["args"]
    threads = result["rule_threads"]
    floors = result.get("import_floors", {})
    macs = (big.get("macs") or {}).get("ratio")
    gr = growth(cells) if len(cells) >= 2 else {}
    here = a["cores"]
    node_cores, nodes = a["cores_per_node"], a["nodes"]
    rows, total_here, total_cluster = [], 0.0, 0.0
    peak_here, peak_node = 0.0, 0.0
    d_ratio = sp["dates"] / big["dates"]
    for rule in STAGES:
        st = big["stages"].get(rule)
        if not st:
            continue
        th = threads.get(rule, 1)
        slots_here = max(1, here // th)
        slots_cluster = max(1, nodes * (node_cores // th))
        per_node = max(1, node_cores // th)
        if rule in BLOCK_STAGES:
            jobs = [j for j in big["jobs"].values() if j["rule"] == rule]
            per_block = len(jobs) / big["blocks"]
            rates = [j["s"] / (big["block_cells"][j["block"]] * big["dates"]) for j in jobs]
            rate = statistics.median(rates)
            mem = [j["peak_mb"] for j in jobs if j["peak_mb"]]
            peak_meas = max(mem) if mem else None
            ref_cells = max(big["block_cells"][j["block"]] for j in jobs)
            ratio = sp["interior_read_cells"] * sp["dates"] / (ref_cells * big["dates"])
            s_meas = statistics.median([j["s"] for j in jobs if big["block_cells"][j["block"]] == ref_cells])
            s_block = s_meas * ratio
            fl = floors.get(rule, {})
            f_s, f_mb = fl.get("s"), fl.get("peak_mb")
            s_block_fl = f_s + (s_meas - f_s) * ratio if f_s is not None and s_meas > f_s else None
            peak_ratio = peak_meas * ratio if peak_meas else None
            peak_fl = f_mb + (peak_meas - f_mb) * ratio if f_mb and peak_meas and peak_meas > f_mb else None
            if rule == "predict_block" and macs:
                note = f"x{macs:.1f} for s2tile's model (MACs): {fmt(s_block * macs)} s per block"
            else:
                note = ""
            n_jobs = round(per_block * sp["blocks"])
            job_seconds = per_block * sum(rate * c * sp["dates"] for c in sp["block_read_cells"])
            waves_here = math.ceil(n_jobs / slots_here)
            waves_cluster = math.ceil(n_jobs / slots_cluster)
            wall_here = max(job_seconds / slots_here, s_block)
            wall_cluster = max(waves_cluster * s_block, job_seconds / slots_cluster)
            pk = peak_fl or peak_ratio
            rows.append(dict(stage=rule, kind="block", jobs=n_jobs, threads=th, measured_s=s_meas,
                             measured_peak_mb=peak_meas, ref_read_cells=ref_cells, ratio=ratio,
                             per_block_s=s_block, per_block_s_floor=s_block_fl, peak_mb_ratio=peak_ratio,
                             peak_mb_floor=peak_fl, job_seconds=job_seconds, wall_here_s=wall_here,
                             waves_here=waves_here, waves_cluster=waves_cluster,
                             wall_cluster_s=wall_cluster, mem_here_mb=min(n_jobs, slots_here) * (pk or 0),
                             mem_node_mb=min(n_jobs, per_node) * (pk or 0), note=note))
        else:
            g = gr.get(rule, {})
            px_ratio = sp["width"] * sp["height"] / big["pixels"]
            e_t = min(1.5, max(0.0, g.get("time") if g.get("time") is not None else 1.0))
            e_m = min(1.0, max(0.0, g.get("peak") if g.get("peak") is not None else 1.0))
            note = f"time x (cells ratio)^{e_t:.2f} x dates ratio; peak x (cells x dates ratio)^{e_m:.2f}"
            per_job = st["sum_s"] / st["jobs"]
            s_job = per_job * px_ratio ** e_t * d_ratio
            if rule == "train_model":
                hist = (big.get("train") or {}).get("main", {})
                tr = sp["cfg"].get("train", {})
                samples = (tr.get("samples_per_epoch") or 0) * tr.get("epochs", 30)
                if hist.get("train_samples") and hist.get("epoch_s") and samples:
                    px = (sp["tile_size"] / a["tile_size"]) ** 2
                    fixed = max(0.0, per_job - hist["epoch_s"])
                    s_job = fixed + hist["epoch_s"] * samples / hist["train_samples"] * px * (macs or 1.0)
                    note = (f"{fmt(fixed)} s start-up + epoch {fmt(hist['epoch_s'])} s (train + validation) x "
                            f"{samples:,} / {hist['train_samples']:.0f} samples (samples_per_epoch x epochs, no "
                            f"early stop) x {px:.0f} (tile pixels)" + (f" x {macs:.1f} (model MACs)" if macs else ""))
            pk = st["peak_max_mb"] * (px_ratio * d_ratio) ** e_m if st["peak_max_mb"] else None
            par_here = min(st["jobs"], slots_here)
            par_cluster = min(st["jobs"], slots_cluster)
            wall_here = s_job * math.ceil(st["jobs"] / par_here)
            wall_cluster = s_job * math.ceil(st["jobs"] / par_cluster)
            rows.append(dict(stage=rule, kind="single", jobs=st["jobs"], threads=th, measured_s=per_job,
                             measured_peak_mb=st["peak_max_mb"], per_block_s=s_job, peak_mb_ratio=pk,
                             job_seconds=s_job * st["jobs"], wall_here_s=wall_here, wall_cluster_s=wall_cluster,
                             mem_here_mb=par_here * (pk or 0), mem_node_mb=min(st["jobs"], per_node) * (pk or 0),
                             note=note))
        total_here += rows[-1]["wall_here_s"]
        total_cluster += rows[-1]["wall_cluster_s"]
        peak_here = max(peak_here, rows[-1]["mem_here_mb"])
        peak_node = max(peak_node, rows[-1]["mem_node_mb"])
    disk = sum(big["disk_bytes"].values()) / (big["pixels"] * big["dates"]) * sp["width"] * sp["height"] * sp["dates"]
    predict_rows = [r for r in rows if r["stage"] == "predict_block"]
    macs_extra = None
    if macs and predict_rows:
        r = predict_rows[0]
        macs_extra = dict(here_s=r["wall_here_s"] * (macs - 1), cluster_s=r["wall_cluster_s"] * (macs - 1))
    return dict(reference=big["label"], rows=rows, wall_here_s=total_here, wall_cluster_s=total_cluster,
                peak_here_mb=peak_here, peak_node_mb=peak_node, disk_bytes=disk, macs_ratio=macs,
                macs_extra=macs_extra)


# --- report -----------------------------------------------------------------------------------------------------


def hms(s) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def gb(mb) -> str:
    return "–" if mb is None else f"{mb / 1024:.2f}" if mb < 10240 else f"{mb / 1024:.0f}"


def markdown(result: dict) -> str:
    a = result["args"]
    cells = [c for c in result["cells"] if "stages" in c]
    lines = []
    failed = [c for c in result["cells"] if "stages" not in c]
    for c in failed:
        lines.append(f"\n**{c['label']} failed:** {c.get('error', '?')[-600:]}\n")
    if not cells:
        return "\n".join(lines)

    lines.extend(["\n## Cells\n",
                  "| cell | dates | blocks | block jobs | jobs run (planned by dry-run) | read / core cells "
                  "| dry-run s | run wall s | block stages' wall s (union) | largest job peak MB (job) "
                  "| Snakemake tree peak MB | disk GB | benchmark possible | load 1 min before, after |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |"])
    for c in cells:
        job, pk = largest_peak(c)
        nblock = sum(1 for j in c["jobs"].values() if j["rule"] in BLOCK_STAGES)
        planned = sum(c["dry_run"]["jobs"].values())
        lines.append(f"| {c['label']} | {c['dates']} | {c['blocks']} | {nblock} | {len(c['jobs'])} ({planned}) "
                     f"| {c['read_cells'] / c['pixels']:.2f} | {c['dry_run']['s']:.1f} | {c['run']['wall_s']:.0f} "
                     f"| {c['block_wall_s']:.0f} | {fmt(pk)} ({job}) | {c['run']['tree_peak_mb']:.0f} "
                     f"| {sum(c['disk_bytes'].values()) / 1e9:.2f} | {c['benchmark_possible']} "
                     f"| {c['load_avg_before'][0]:.1f}, {c['load_avg_after'][0]:.1f} |")
        if c.get("unknown_tsv"):
            lines.append(f"\n(unclassified benchmark TSVs in {c['label']}: {', '.join(c['unknown_tsv'])})\n")

    for c in cells:
        lines.extend([f"\n## Stages, {c['label']} ({c['blocks']} blocks)\n",
                      "Seconds: TSV `s`; span = wall time during which at least one of the stage's jobs ran; peak = "
                      f"max(TSV max_rss, this script's {a['sample_s']} s sample of the job's process tree); CPU = "
                      "sampled user + system of the tree.\n",
                      "| stage | jobs | sum s | span s | job s max | job s median | peak MB max | peak MB median "
                      "| largest job | CPU s |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"])
        for rule in STAGES:
            st = c["stages"].get(rule)
            if not st:
                continue
            lines.append(f"| {rule} | {st['jobs']} | {fmt(st['sum_s'])} | {fmt(st['span_s'])} | {fmt(st['max_s'])} "
                         f"| {fmt(st['median_s'])} | {fmt(st['peak_max_mb'])} | {fmt(st['peak_median_mb'])} "
                         f"| {st['peak_job']} | {fmt(st['cpu_sum_s'])} |")
        lines.append(f"| **block stages** | {sum(c['stages'][r]['jobs'] for r in BLOCK_STAGES if r in c['stages'])} "
                     f"| {fmt(stage_sum(c, BLOCK_STAGES))} | {fmt(c['block_wall_s'])} | | | "
                     f"{fmt(max((c['stages'][r]['peak_max_mb'] or 0) for r in BLOCK_STAGES if r in c['stages']))} "
                     f"| | | {fmt(stage_sum(c, BLOCK_STAGES, 'cpu_sum_s'))} |")
        lines.append(f"| **all** | {len(c['jobs'])} | {fmt(sum(j['s'] for j in c['jobs'].values()))} "
                     f"| {fmt(c['run']['wall_s'])} (Snakemake wall) | | | {fmt(largest_peak(c)[1])} | | | "
                     f"{fmt(sum(j['cpu_s'] or 0 for j in c['jobs'].values()))} |")

    # peaks across cells
    small, big = min(cells, key=lambda c: c["pixels"]), max(cells, key=lambda c: c["pixels"])
    lines.extend(["\n## Peak memory across cells (MB, max over the stage's jobs)\n",
                  "| stage | " + " | ".join(c["label"] for c in cells) + f" | ratio {big['label']} / {small['label']} |",
                  "| --- |" + " ---: |" * (len(cells) + 1)])
    for rule in STAGES:
        vals = [c["stages"].get(rule, {}).get("peak_max_mb") for c in cells]
        if not any(vals):
            continue
        r = vals[-1] / vals[0] if vals[0] and vals[-1] else None
        lines.append(f"| {rule} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(r, 2)} |")
    pk = [largest_peak(c)[1] for c in cells]
    ratio = pk[-1] / pk[0] if pk[0] and pk[-1] and len(cells) > 1 else None
    verdict = "–" if ratio is None else ("met" if ratio <= PEAK_TARGET else "NOT met")
    lines.append(f"| **largest job overall** | " + " | ".join(
        f"{fmt(v)} ({largest_peak(c)[0]})" for v, c in zip(pk, cells)) + f" | **{fmt(ratio, 2)}** |")
    lines.append(f"\nLargest-job peak ratio {big['label']} / {small['label']}: **{fmt(ratio, 2)}** "
                 f"(target <= {PEAK_TARGET}: {verdict}).")

    # growth
    if len(cells) >= 2:
        gr = growth(cells)
        lines.extend([f"\n## Growth with area (dates fixed at {cells[0]['dates']})\n",
                      "Exponent b of seconds ∝ cells^b, least squares on log-log over the cells; top pair = the "
                      "two largest cells only (fixed per-job costs weigh least); CPU = sampled CPU seconds.\n",
                      "| stage | " + " | ".join(f"sum s {c['label']}" for c in cells)
                      + " | exponent (time) | top pair | exponent (CPU) | exponent (peak) |",
                      "| --- |" + " ---: |" * (len(cells) + 4)])
        for name, g in gr.items():
            if name in STAGES:
                vals = [c["stages"].get(name, {}).get("sum_s") for c in cells]
            elif name.startswith("sum of the block"):
                vals = [stage_sum(c, BLOCK_STAGES) for c in cells]
            elif name.startswith("sum of the data"):
                vals = [stage_sum(c, DATA_STAGES) for c in cells]
            else:
                vals = [c["block_wall_s"] for c in cells]
            bold = "**" if name == "sum of the block stages" else ""
            lines.append(f"| {bold}{name}{bold} | " + " | ".join(fmt(v) for v in vals)
                         + f" | {bold}{fmt(g['time'], 2)}{bold} | {fmt(g['time_top'], 2)} | {fmt(g['cpu'], 2)} "
                         f"| {fmt(g['peak'], 2)} |")
        e = gr["sum of the block stages"]["time"]
        ok = "–" if e is None else "met" if EXPONENT_BAND[0] <= e <= EXPONENT_BAND[1] else "NOT met"
        lines.append(f"\nBlock stages' time exponent: **{fmt(e, 2)}** (target {EXPONENT_BAND[0]}-"
                     f"{EXPONENT_BAND[1]}: {ok}); data stages: {fmt(gr['sum of the data stages']['time'], 2)}.")

    # cores
    ct = next(((c, c["cores_test"]) for c in cells if c.get("cores_test")), None)
    if ct:
        c, t = ct
        ns = list(t["runs"])
        lines.extend([f"\n## Cores: block stages of {c['label']} forced again from the finished upstream\n",
                      f"`--forcerun` / `--allowed-rules` {' '.join(BLOCK_STAGES)}, {t['targets']} target files; "
                      + ("each run pinned to that many CPUs (sched_setaffinity)."
                         if t["pinned"] else "unpinned: --cores limits Snakemake's scheduling only.")
                      + " Span = wall time during which at least one of the stage's jobs ran.\n",
                      "| stage | " + " | ".join(f"span s, --cores {n}" for n in ns)
                      + " | speedup | " + " | ".join(f"sum s, --cores {n}" for n in ns) + " |",
                      "| --- |" + " ---: |" * (2 * len(ns) + 1)])

        def sp_(x, y):
            return x / y if x and y else None

        for rule in BLOCK_STAGES:
            spans = [t["runs"][n]["stages"].get(rule, {}).get("span_s") for n in ns]
            sums = [t["runs"][n]["stages"].get(rule, {}).get("sum_s") for n in ns]
            lines.append(f"| {rule} | " + " | ".join(fmt(v) for v in spans) + f" | {fmt(sp_(spans[0], spans[-1]), 2)} | "
                         + " | ".join(fmt(v) for v in sums) + " |")
        w = [t["runs"][n]["block_wall_s"] for n in ns]
        sw = [t["runs"][n]["wall_s"] for n in ns]
        lines.append("| **block stages (union of job intervals)** | " + " | ".join(fmt(v) for v in w)
                     + f" | **{fmt(sp_(w[0], w[-1]), 2)}** | " + " | ".join("" for _ in ns) + " |")
        lines.append("| Snakemake call wall (incl. start-up, DAG) | " + " | ".join(fmt(v) for v in sw)
                     + f" | {fmt(sp_(sw[0], sw[-1]), 2)} | " + " | ".join("" for _ in ns) + " |")
        reps = t.get("repeats", {})
        if reps and len(reps[ns[0]]) > 1:
            lines.append(f"\nThe table's columns are the median of {len(reps[ns[0]])} repeats (by block-stage wall). "
                         "Every repeat's block-stage wall s: " + "; ".join(
                             f"--cores {n}: " + ", ".join(fmt(x["block_wall_s"]) for x in reps[n]) for n in ns)
                         + "; per-repeat speedups: " + ", ".join(
                             fmt(sp_(a["block_wall_s"], b["block_wall_s"]), 2) for a, b in zip(reps[ns[0]], reps[ns[-1]]))
                         + ".")
        s = sp_(w[0], w[-1])
        ok = "–" if s is None else "met" if s >= SPEEDUP_TARGET else "NOT met"
        lines.append(f"\nBlock-stage speedup --cores {ns[0]} -> {ns[-1]}: **{fmt(s, 2)}x** (target >= "
                     f"{SPEEDUP_TARGET}: {ok}). Block rules with more than one thread (one job per that many cores): "
                     + (", ".join(f"{r} ({result['rule_threads'][r]})" for r in BLOCK_STAGES
                                  if result["rule_threads"].get(r, 1) > 1) or "none") + ".")

    # per cell-date
    lines.extend(["\n## Cost per cell-date (ns = seconds / (pixels x dates) x 1e9), old whole-region path vs blocks\n",
                  "Old: docs/scaling.md (run A: small grid; run B: quiet re-run). New: this run, sum over the "
                  "stage's jobs (the block path reads each block with its halo: read/core cells in the first table)."
                  " Wall s / CPU s.\n"])
    old_cols = list(OLD_PATH)
    new_cols = [c for c in cells if c["side"] in (512, 1024)] or [small]
    one = result.get("one_block") if result.get("one_block") and "error" not in result["one_block"] else None
    if one:
        lines.append(f"Baseline of the same run: {one['label']} as **one block** (blocks.size {one['side']}: no halo, "
                     "one job per stage, the whole region in memory as before blocks), against the smallest cell in "
                     f"{small['blocks']} blocks.\n")
    lines.extend(["| stage | " + " | ".join(f"old {k}" for k in old_cols) + " | "
                  + " | ".join(f"new {c['label']}" for c in new_cols)
                  + (f" | one block {one['label']} | blocks / one block" if one else "")
                  + " | new / old B (512²) |",
                  "| --- |" + " ---: |" * (len(old_cols) + len(new_cols) + 1 + (2 if one else 0))])
    for key, (rules, variant) in PER_CELL_DATE.items():
        row = []
        for k in old_cols:
            o = OLD_PATH[k]
            n = o["side"] ** 2 * o["dates"]
            if key in o["s"]:
                row.append(f"{o['s'][key] / n * 1e9:.0f} / {o['cpu'][key] / n * 1e9:.0f}")
            else:
                row.append("–")
        new_vals = []
        for c in new_cols:
            js = [j for j in c["jobs"].values() if j["rule"] in rules and (variant is None or j.get("variant") == variant)]
            n = c["pixels"] * c["dates"]
            s = sum(j["s"] for j in js) / n * 1e9 if js else None
            cp = sum(j["cpu_s"] or 0 for j in js) / n * 1e9 if js else None
            new_vals.append((c, s))
            row.append(f"{fmt(s, 0)} / {fmt(cp, 0)}")
        if one:
            js = [j for j in one["jobs"].values() if j["rule"] in rules and (variant is None or j.get("variant") == variant)]
            n = one["pixels"] * one["dates"]
            s1 = sum(j["s"] for j in js) / n * 1e9 if js else None
            c1 = sum(j["cpu_s"] or 0 for j in js) / n * 1e9 if js else None
            sb = next((s for c, s in new_vals if c["side"] == one["side"]), None)
            row.append(f"{fmt(s1, 0)} / {fmt(c1, 0)}")
            row.append(fmt(sb / s1 if sb and s1 else None, 2))
        ob = OLD_PATH["B 50d·512²"]
        n512 = [s for c, s in new_vals if c["side"] == 512 and c["dates"] == ob["dates"]]
        rel = n512[0] / (ob["s"][key] / (512 ** 2 * 50) * 1e9) if n512 and n512[0] and key in ob["s"] else None
        lines.append(f"| {PER_CELL_DATE_LABEL[key]} | " + " | ".join(row) + f" | {fmt(rel, 2)} |")

    # s2tile
    ex = result.get("extrapolation")
    if ex:
        sp = result["s2tile"]
        lines.extend([f"\n## Extrapolation to s2tile ({sp['width']}² cells, {sp['dates']} dates, blocks.size "
                      f"{sp['block_size']}, halo {sp['halo']}: {sp['blocks']} blocks) from {ex['reference']}\n",
                      "Block stages: the measured median seconds of the largest blocks (full halo) x (read cells x "
                      "dates) ratio, as asked (this also scales each job's fixed start-up cost: pessimistic); "
                      "'floor' = the fresh-interpreter import cost of the rule's step module kept fixed and only the "
                      "rest scaled. Peak likewise (x ratio: upper bound; floor: import RSS fixed). Other stages: "
                      "by their fitted growth with area, linear in dates (assumption: dates fixed in this run). "
                      f"Wall: stages one after the other (no overlap), each on this machine's {a['cores']} cores or "
                      f"{a['nodes']} nodes x {a['cores_per_node']} cores, one job per `threads` cores of its rule. "
                      "Memory: the stage's concurrent jobs x per-job peak (floor-corrected where measured).\n",
                      "| stage | jobs | threads | measured s (per job) | measured peak MB | ratio | s per job (x ratio) "
                      "| s per job (floor) | peak MB (x ratio) | peak MB (floor) | job-hours | wall here "
                      f"| wall, {a['nodes']} x {a['cores_per_node']} cores | concurrent GB here | GB per node | note |",
                      "| --- |" + " ---: |" * 14 + " --- |"])
        for r in ex["rows"]:
            lines.append(f"| {r['stage']} | {r['jobs']} | {r['threads']} | {fmt(r['measured_s'])} "
                         f"| {fmt(r['measured_peak_mb'])} | {fmt(r.get('ratio'), 1)} | {fmt(r['per_block_s'])} "
                         f"| {fmt(r.get('per_block_s_floor'))} | {fmt(r.get('peak_mb_ratio'))} "
                         f"| {fmt(r.get('peak_mb_floor'))} | {fmt(r['job_seconds'] / 3600, 1)} | {hms(r['wall_here_s'])} "
                         f"| {hms(r['wall_cluster_s'])} | {gb(r['mem_here_mb'])} | {gb(r['mem_node_mb'])} "
                         f"| {r['note']} |")
        ram = result["machine"]["ram_gb"]
        lines.append(f"| **total** | | | | | | | | | | {fmt(sum(r['job_seconds'] for r in ex['rows']) / 3600, 1)} "
                     f"| **{hms(ex['wall_here_s'])}** | **{hms(ex['wall_cluster_s'])}** "
                     f"| **{gb(ex['peak_here_mb'])}** (RAM {ram}) | **{gb(ex['peak_node_mb'])}** | |")
        lines.append(f"\nDisk (results + benchmarks + logs, per cell-date of {ex['reference']}, scaled): "
                     f"~{ex['disk_bytes'] / 1e12:.2f} TB.")
        if ex.get("macs_extra"):
            lines.append(f"With s2tile's model in predict_block too: **{hms(ex['wall_here_s'] + ex['macs_extra']['here_s'])}"
                         f"** here, **{hms(ex['wall_cluster_s'] + ex['macs_extra']['cluster_s'])}** on the cluster.")
        if ex.get("macs_ratio"):
            m = ex["macs_ratio"]
            lines.append(f"s2tile's model ({sp['cfg'].get('train', {}).get('model_params')}) costs {m:.1f}x the "
                         "measured model's multiply-accumulates per pixel; the predict row does not include that "
                         f"(x {m:.1f}: +{hms(ex['macs_extra']['here_s'])} here, +{hms(ex['macs_extra']['cluster_s'])} "
                         "on the cluster); the train row does.")
        fl = result.get("import_floors", {})
        if fl:
            lines.append("Import floors (fresh interpreter, s / peak MB): " + ", ".join(
                f"{r} {fmt(v.get('s'), 1)} / {fmt(v.get('peak_mb'))}" for r, v in fl.items()) + ".")
    if result.get("s2tile_dry_run"):
        d = result["s2tile_dry_run"]
        lines.append(f"\ns2tile DAG: `snakemake -n` with config/studies/s2tile.yaml on a fresh folder took "
                     f"{d['s']:.1f} s and planned {sum(d['jobs'].values())} jobs before the holdout checkpoint "
                     f"({', '.join(f'{k} {v}' for k, v in d['jobs'].items())}).")
    return "\n".join(lines)


def report(result: dict) -> str:
    m, a = result["machine"], result["args"]
    head = [f"\n# stfuse block path: cost per stage and block\n",
            f"- date: {result['date']}; total {(result.get('total_s') or 0) / 60:.1f} min",
            f"- machine: {m['cpu']}, nproc {m['cores']}, {m['ram_gb']} GiB RAM, {m['platform']}, Python "
            f"{m['python']}, Snakemake {result.get('snakemake_version', '?')}",
            f"- command: `{result['command']}`",
            f"- work folders: {result.get('workdir', '?')} ({(result.get('disk_free_bytes') or 0) / 1e9:.0f} GB free "
            "at the start)",
            f"- cells: {a['dates']} optical dates x {', '.join(f'{s}²' for s in a['sides'])}; blocks.size "
            f"{a['block_size']}, halo = tiles.size {a['tile_size']}; train.epochs 1, train.samples_per_epoch "
            + (f"{a['samples_per_epoch']}" if a["samples_per_epoch_applied"] else
               "NOT SET (not in the config schema when this ran: one full epoch, growing with area)")
            + (f"; infer.threads and predict_block's threads {a['predict_threads']} (--set-threads)"
               if a.get("predict_threads") else "; infer defaults") + "; "
            f"--cores {a['cores']}; target {' '.join(a.get('targets') or []) or 'default (the whole workflow)'}; "
            f"sampler every {a['sample_s']} s"
            + (f"; `scontrol show config` {result['scontrol_probe_s']:.1f} s"
               + (" (stubbed for the Snakemake calls: --no-slurm-probe)" if a.get("no_slurm_probe") else "")
               if result.get("scontrol_probe_s") is not None else "")]
    return "\n".join(head) + "\n" + markdown(result)


# --- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="512,1024,2048", help="cell sides in pixels, comma separated")
    ap.add_argument("--dates", type=int, default=50, help="optical dates of every cell")
    ap.add_argument("--block-size", type=int, default=256, help="config blocks.size of every cell")
    ap.add_argument("--tile-size", type=int, default=32, help="config tiles.size (= the blocks' halo)")
    ap.add_argument("--samples-per-epoch", type=int, default=2000, help="config train.samples_per_epoch")
    ap.add_argument("--predict-threads", type=int, default=None,
                    help="config infer.threads and predict_block's threads (--set-threads) in every run (default: "
                         "the workflow's, 2 and 2: one predict job at a time under --cores 2)")
    ap.add_argument("--cores", type=int, default=2, help="--cores of the end-to-end runs")
    ap.add_argument("--targets", default="", help="Snakemake targets, comma separated (default: the default "
                                                   "target, the whole workflow), e.g. register")
    ap.add_argument("--cores-side", type=int, default=1024, help="the cell whose block stages rerun per --cores")
    ap.add_argument("--cores-compare", default="1,2", help="--cores values of the cores test")
    ap.add_argument("--cores-repeats", type=int, default=3, help="cores test: runs per --cores value (medians)")
    ap.add_argument("--no-one-block-baseline", dest="one_block_baseline", action="store_false",
                    help="skip the baseline run: the smallest cell again as one block (blocks.size = its side)")
    ap.add_argument("--no-cores-test", action="store_true")
    ap.add_argument("--pin", action="store_true", help="cores test: limit each run to that many CPUs as well")
    ap.add_argument("--nodes", type=int, default=10, help="s2tile extrapolation: cluster nodes")
    ap.add_argument("--cores-per-node", type=int, default=16, help="s2tile extrapolation: cores per node")
    ap.add_argument("--no-s2tile-dag", action="store_true", help="skip timing s2tile's dry-run")
    ap.add_argument("--smoke", action="store_true",
                    help="smoke test of this script: 10 dates x 64², 128², blocks.size 64, cores test on 128²")
    ap.add_argument("--json")
    ap.add_argument("--sample-s", type=float, default=0.2)
    ap.add_argument("--cell-timeout", type=float, default=4 * 3600.0, help="seconds per Snakemake call")
    ap.add_argument("--workdir", help="parent of the per-cell work folders (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folders")
    ap.add_argument("--ignore-disk", action="store_true",
                    help="run a cell even where the previous cell's disk use per cell-date says it will not fit")
    ap.add_argument("--no-slurm-probe", action="store_true",
                    help="put a failing `scontrol` first on the PATH of the Snakemake calls (see bench_scaling.py)")
    ap.add_argument("--from-json", help="print the tables of a saved --json result and exit (runs nothing)")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        if result.get("extrapolation") is None:  # a partial result (written after each cell)
            result["s2tile"]["block_read_cells"] = s2tile_spec()["block_read_cells"]
            result["extrapolation"] = extrapolate(result)
        print(report(result))
        return
    if args.smoke:
        args.sides, args.dates, args.block_size, args.cores_side = "64,128", 10, 64, 128
        args.samples_per_epoch = min(args.samples_per_epoch, 200)
    args.sides = sorted(int(s) for s in str(args.sides).split(","))
    args.targets = [t for t in args.targets.split(",") if t]
    args.cores_compare = [int(n) for n in str(args.cores_compare).split(",")]
    args.samples_per_epoch_applied = schema_has("train", "samples_per_epoch")
    if not args.samples_per_epoch_applied:
        print("WARNING: config key train.samples_per_epoch is not in the schema yet: not set (one full epoch, "
              "whose cost grows with the area)", file=sys.stderr, flush=True)
    if args.cores_side not in args.sides and not args.no_cores_test:
        raise SystemExit(f"--cores-side {args.cores_side} is not one of --sides {args.sides}")

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="stfuse_blocks_"))
    root.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    probe_s = bs.slurm_probe(root, args.no_slurm_probe)
    smk_version = subprocess.run([str(SNAKEMAKE), "--version"], capture_output=True, text=True).stdout.strip()

    s2 = s2tile_spec()
    result = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=bs.machine(),
                  command=" ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, ROOT), *sys.argv]),
                  args=vars(args), snakemake_version=smk_version, scontrol_probe_s=probe_s,
                  workdir=str(root), disk_free_bytes=shutil.disk_usage(root).free,
                  rule_threads=rule_threads(), s2tile={k: v for k, v in s2.items() if k != "block_read_cells"},
                  cells=[])
    if args.predict_threads:  # --set-threads in every run
        result["rule_threads"]["predict_block"] = args.predict_threads
    result["import_floors"] = {r: import_floor(m) for r, m in STEP_MODULES.items()}
    if not args.no_s2tile_dag:
        d2 = root / "s2tile_dag"
        d2.mkdir(exist_ok=True)
        try:
            result["s2tile_dry_run"] = dry_run(d2, S2TILE, args.cores)
        except RuntimeError as err:
            result["s2tile_dry_run"] = None
            print(f"s2tile dry-run failed: {str(err)[-500:]}", file=sys.stderr, flush=True)
        shutil.rmtree(d2, ignore_errors=True)

    prev = None
    for side in args.sides:
        est = (f"~{hms(prev['run']['wall_s'] * side ** 2 / prev['pixels'])} (previous cell x area)"
               if prev else "no estimate")
        free = shutil.disk_usage(root).free
        if prev:  # the whole work folder stays until the cell ends: its size at the end is its peak
            need = sum(prev["disk_bytes"].values()) / (prev["pixels"] * prev["dates"]) * side ** 2 * args.dates
            if need > 0.95 * free and not args.ignore_disk:
                why = (f"needs ~{need / 1e9:.0f} GB of disk (previous cell's bytes per cell-date x this cell), "
                       f"{free / 1e9:.0f} GB free under {root} (--ignore-disk to try anyway, --workdir elsewhere)")
                print(f"[{label(args.dates, side)}] skipped: {why}", file=sys.stderr, flush=True)
                result["cells"].append(dict(label=label(args.dates, side), side=side, error=f"skipped: {why}"))
                continue
            est += f", ~{need / 1e9:.0f} GB of disk of {free / 1e9:.0f} GB free"
        print(f"[{label(args.dates, side)}] whole workflow, --cores {args.cores} ({est}) ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        try:
            res = run_cell(root, args.dates, side, args, cores_test_here=(side == args.cores_side
                                                                          and not args.no_cores_test),
                           largest=(side == args.sides[-1]), s2tile=s2)
        except Exception as err:  # record it and go on with the other cells
            res = dict(label=label(args.dates, side), side=side, error=str(err))
            print(f"[{label(args.dates, side)}] failed: {str(err)[-2000:]}", file=sys.stderr, flush=True)
        else:
            prev = res
            print(f"[{label(args.dates, side)}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
        result["cells"].append(res)
        if args.json:  # partial results survive a later failure
            Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")

    if args.one_block_baseline:
        side = args.sides[0]
        print(f"[{label(args.dates, side)}, one block] the same cell as one block (blocks.size {side}: no halo, "
              "the whole region read at once) ...", file=sys.stderr, flush=True)
        base_args = argparse.Namespace(**{**vars(args), "block_size": side})
        try:
            result["one_block"] = run_cell(root / "one_block", args.dates, side, base_args, cores_test_here=False,
                                           largest=False, s2tile=s2)
        except Exception as err:
            result["one_block"] = dict(label=label(args.dates, side), side=side, error=str(err))
            print(f"[one block] failed: {str(err)[-2000:]}", file=sys.stderr, flush=True)

    result["s2tile"]["block_read_cells"] = s2["block_read_cells"]
    result["extrapolation"] = extrapolate(result)
    result["total_s"] = time.perf_counter() - t_all
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if not args.workdir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
