#!/usr/bin/env bash
# Run the demo workflow (config/config.yaml) twice from scratch, once through profiles/slurm on the
# running Slurm cluster and once locally through profiles/default, then compare what they made:
#   - ingest JSONs (results/demo/ingest/*.json), the work directory in absolute paths normalised;
#   - training tiles (every block's results/demo/main/blocks/*/tiles/tiles.npy, the store's index.csv),
#     byte for byte;
#   - benchmark scores (results/demo/benchmark/scores.csv), byte for byte (tolerance fallback, see below).
# Also checks with sacct that every job of the Slurm run went through Slurm and COMPLETED, and measures from
# sacct's start and end times how many block jobs ran at once.
# The demo runs with STFUSE_SLURM_DEMO_BLOCKS-cell blocks (default 48: 2 x 2 blocks of the 96 x 96 scene) and
# the Slurm run with --jobs STFUSE_SLURM_JOBS (default 4) and --group-components STFUSE_SLURM_GROUPS
# (default "cube=1 tiles=1 predict=1 score_stats=1 score=1": one block job per Slurm job on the 2-CPU test node, where a
# group job, which asks for the sum of its parts' cores and memory, would not fit).
#
#   bash scripts/slurm/run_demo.sh [--parallel] [WORKDIR]    # WORKDIR: /tmp/stfuse-slurm-demo (wiped first)
#
# Both runs use one snapshot of the code (Snakefile, workflow/, src/, config/, profiles/, envs/ copied to
# WORKDIR/code, stfuse imported from there through PYTHONPATH), so an edit to the checkout while the
# runs go on cannot make them differ. --parallel runs the local run while the Slurm run waits on the
# queue (shorter in total; the timings then include each other's load).
# WORKDIR must be on a file system the compute nodes see (any path on the one-node test cluster).
# Environment: STFUSE_SLURM_RUN_TIMEOUT (seconds per Snakemake run, 1500), STFUSE_SLURM_POLL (seconds of
# the plugin's first status poll, 2: a quiet one-node cluster; the profile's 20 suits shared clusters),
# SNAKEMAKE (the snakemake executable, .venv/bin/snakemake).
# Exit status: 0 same outputs; 1 a run failed or outputs differ; 2 no cluster / bad set-up.
# Writes WORKDIR/summary.json (timings, Slurm run id and jobs, comparison) and WORKDIR/{slurm,local}.log.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PARALLEL=0
if [ "${1:-}" = --parallel ]; then PARALLEL=1; shift; fi
WORK=${1:-${STFUSE_SLURM_DEMO_DIR:-/tmp/stfuse-slurm-demo}}
SNAKEMAKE=${SNAKEMAKE:-$ROOT/.venv/bin/snakemake}
PY=$(dirname "$SNAKEMAKE")/python
TIMEOUT=${STFUSE_SLURM_RUN_TIMEOUT:-1500}
POLL=${STFUSE_SLURM_POLL:-2}

say() { printf '[slurm-demo] %s\n' "$*"; }
die() { local code=$1; shift; printf '[slurm-demo] ERROR: %s\n' "$*" >&2; exit "$code"; }

[ -x "$SNAKEMAKE" ] || die 2 "no $SNAKEMAKE (run scripts/setup.sh first)"
"$PY" -c 'import snakemake_executor_plugin_slurm' 2>/dev/null \
  || die 2 "snakemake-executor-plugin-slurm is not importable by $PY (make setup-slurm installs it into the venv; or put a folder holding it on PYTHONPATH)"
command -v sbatch >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1 \
  || die 2 "no Slurm cluster answers (start the test cluster with scripts/slurm/start.sh)"
case "$WORK" in /*) ;; *) WORK=$PWD/$WORK ;; esac
# While the runs go on, a shared lock keeps scripts/slurm/stop.sh (another session's) from stopping
# the test cluster under them.
STATE=${STFUSE_SLURM_DIR:-/tmp/stfuse-slurm}
if [ -d "$STATE" ] && [ -w "$STATE" ]; then
  exec 9>>"$STATE/use.lock"
  flock -s 9
  sinfo -h >/dev/null 2>&1 || die 2 "the Slurm cluster stopped while waiting for $STATE/use.lock"
fi

# Wiped before the runs: only a directory this script made (marker file), an empty one or a new one.
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ] && [ ! -f "$WORK/.stfuse-slurm-demo" ]; then
  die 2 "$WORK is not empty and was not made by this script; give a new or empty WORKDIR"
fi
rm -rf "$WORK"
mkdir -p "$WORK/slurm" "$WORK/local" "$WORK/code"
touch "$WORK/.stfuse-slurm-demo"
# One frozen copy of the code for both runs (see the header).
tar -C "$ROOT" --exclude=__pycache__ -cf - Snakefile workflow src config profiles envs | tar -C "$WORK/code" -xf -
CODE=$WORK/code
CONFIG=$WORK/config.yaml
BLOCKS=${STFUSE_SLURM_DEMO_BLOCKS:-48}
"$PY" - "$CODE/config/config.yaml" "$CONFIG" "$BLOCKS" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["blocks"] = {"size": int(sys.argv[3])}
open(sys.argv[2], "w").write(yaml.safe_dump(cfg, sort_keys=False))
PY
export PYTHONPATH=$CODE/src${PYTHONPATH:+:$PYTHONPATH}
[ "$("$PY" -c 'import stfuse, os; print(os.path.dirname(os.path.dirname(stfuse.__file__)))')" = "$CODE/src" ] \
  || die 2 "stfuse is not imported from the snapshot $CODE/src"

run() {  # run NAME SNAKEMAKE-ARGS...: one fresh run in WORK/NAME, seconds into WORK/NAME.seconds
  local name=$1; shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  (cd "$WORK/$name" && timeout "$TIMEOUT" "$SNAKEMAKE" -s "$CODE/Snakefile" --configfile "$CONFIG" "$@") \
    >"$WORK/$name.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f\n", b - a}' > "$WORK/$name.seconds"
  if [ "$rc" != 0 ]; then
    tail -n 60 "$WORK/$name.log" >&2
    say "the $name run failed (exit $rc; log $WORK/$name.log)"
    return 1
  fi
  say "$name run done in $(cat "$WORK/$name.seconds") s (log $WORK/$name.log)"
}
run_slurm() {
  say "Slurm run: snakemake --profile profiles/slurm --workflow-profile none in $WORK/slurm"
  # shellcheck disable=SC2086  # the group list is word-split on purpose
  run slurm --profile "$CODE/profiles/slurm" --workflow-profile none --jobs "${STFUSE_SLURM_JOBS:-4}" \
    --group-components ${STFUSE_SLURM_GROUPS:-cube=1 tiles=1 predict=1 score_stats=1 score=1} \
    --slurm-init-seconds-before-status-checks "$POLL" --slurm-keep-successful-logs
}
run_local() {
  say "local run: snakemake --profile profiles/default --cores 2 in $WORK/local"
  run local --profile "$CODE/profiles/default" --cores 2
}

if [ "$PARALLEL" = 1 ]; then
  run_local & local_pid=$!
  slurm_rc=0; run_slurm || slurm_rc=$?
  local_rc=0; wait "$local_pid" || local_rc=$?
  [ "$slurm_rc" = 0 ] && [ "$local_rc" = 0 ] || die 1 "a run failed"
else
  run_slurm || die 1 "the Slurm run failed"
  run_local || die 1 "the local run failed"
fi

run_id=$(sed -n 's/.*SLURM run ID: \([0-9A-Za-z_-]*\).*/\1/p' "$WORK/slurm.log" | head -1)
[ -n "$run_id" ] || die 1 "no 'SLURM run ID' in $WORK/slurm.log: did the run use the slurm executor?"
# The plugin names every sbatch job after the run id: all of them must be in sacct, COMPLETED.
sacct -X -P -n --name "$run_id" -S now-1days -o JobID,State,Elapsed,AllocCPUS,ReqMem,Comment%200,Start,End \
  > "$WORK/sacct.txt" 2>&1 || say "WARNING: sacct failed: $(cat "$WORK/sacct.txt")"

rc=0
STFUSE_DEMO_PARALLEL=$PARALLEL "$PY" - "$WORK" "$run_id" <<'PY' || rc=$?
import filecmp, json, os, sys
from pathlib import Path

import numpy as np
import pandas as pd

work, run_id = Path(sys.argv[1]), sys.argv[2]
slurm, local = work / "slurm", work / "local"
res = "results/demo"
problems, notes = [], []


def norm(path, root):
    return path.read_text().replace(str(root.resolve()), "<WORKDIR>")


ingest = sorted(p.name for p in (slurm / res / "ingest").glob("*.json"))
if sorted(p.name for p in (local / res / "ingest").glob("*.json")) != ingest or not ingest:
    problems.append(f"ingest JSONs differ in number: {ingest}")
for name in ingest:
    a, b = norm(slurm / res / "ingest" / name, slurm), norm(local / res / "ingest" / name, local)
    if json.loads(a) != json.loads(b):
        problems.append(f"ingest/{name} differs (paths normalised)")

block_ids = sorted(p.name for p in (local / res / "blocks").iterdir())
if sorted(p.name for p in (slurm / res / "blocks").iterdir()) != block_ids:
    problems.append("the runs have different blocks")
for rel in ["main/tiles/index.csv"] + [f"main/blocks/{b}/tiles/tiles.npy" for b in block_ids]:
    if not filecmp.cmp(slurm / res / rel, local / res / rel, shallow=False):
        problems.append(f"{rel} differs")

scores = "benchmark/scores.csv"
scores_bitwise = filecmp.cmp(slurm / res / scores, local / res / scores, shallow=False)
scores_max_diff = 0.0
if not scores_bitwise:
    # The training is seeded and deterministic for one thread count (both runs use threads: 2);
    # a difference left is float summation order (e.g. another BLAS/OpenMP split), so allow 1e-5.
    a, b = pd.read_csv(slurm / res / scores), pd.read_csv(local / res / scores)
    num = a.select_dtypes("number").columns
    same_shape = list(a.columns) == list(b.columns) and a.shape == b.shape
    if same_shape and a.drop(columns=num).equals(b.drop(columns=num)):
        scores_max_diff = float(np.nanmax(np.abs(a[num].to_numpy(float) - b[num].to_numpy(float))))
        if np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-5, atol=1e-6, equal_nan=True):
            notes.append(f"scores.csv not bitwise equal, within tolerance (max |diff| {scores_max_diff:.3g})")
        else:
            problems.append(f"scores.csv differs beyond tolerance (max |diff| {scores_max_diff:.3g})")
    else:
        problems.append("scores.csv differs in shape, columns or labels")

# Informational: the filled series and the model's training history.
extra = {}
for variant in ("main", "heldout"):
    for name in ("tiles/tiles.npy", "infer/filled.npy"):
        extra[f"{variant}/blocks/*/{name}"] = all(
            filecmp.cmp(slurm / res / variant / "blocks" / b / name, local / res / variant / "blocks" / b / name,
                        shallow=False) for b in block_ids)
for variant in ("main", "heldout"):  # the losses; the other columns are wall-clock timings
    cols = ["epoch", "train_loss", "val_loss"]
    a, b = (pd.read_csv(d / res / variant / "model/history.csv")[cols] for d in (slurm, local))
    extra[f"{variant}/model/history.csv (losses)"] = a.equals(b)

jobs = []
for line in (work / "sacct.txt").read_text().splitlines():
    parts = line.split("|")
    if len(parts) >= 8 and parts[0]:
        jobs.append({"jobid": parts[0], "state": parts[1], "elapsed": parts[2], "cpus": parts[3],
                     "mem": parts[4], "comment": parts[5], "start": parts[6], "end": parts[7]})


def most_at_once(spans):
    """The largest number of (start, end) spans that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


block_spans = [(pd.Timestamp(j["start"]), pd.Timestamp(j["end"])) for j in jobs
               if ("block" in j["comment"] or j["comment"].startswith("group")) and j["start"] not in ("", "Unknown") and j["end"] not in ("", "Unknown")]
if not jobs:
    problems.append(f"sacct lists no job named {run_id}")
elif any(j["state"] != "COMPLETED" for j in jobs):
    problems.append("not every Slurm job COMPLETED: " + ", ".join(f"{j['comment']}={j['state']}" for j in jobs))

summary = {
    "slurm_seconds": float((work / "slurm.seconds").read_text()),
    "local_seconds": float((work / "local.seconds").read_text()),
    "slurm_run_id": run_id,
    "slurm_jobs": jobs,
    "parallel": os.environ.get("STFUSE_DEMO_PARALLEL") == "1",
    "ingest_jsons": ingest,
    "blocks": block_ids,
    "block_jobs": len(block_spans),
    "most_block_jobs_at_once": most_at_once(block_spans) if block_spans else 0,
    "scores_bitwise_equal": scores_bitwise,
    "scores_max_abs_diff": scores_max_diff,
    "also_identical": extra,
    "notes": notes,
    "problems": problems,
    "ok": not problems,
}
(work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"[slurm-demo] Slurm: {summary['slurm_seconds']:.0f} s, {len(jobs)} jobs; "
      f"local: {summary['local_seconds']:.0f} s; {len(block_ids)} blocks, {len(block_spans)} Slurm jobs of block "
      f"work, at most {summary['most_block_jobs_at_once']} at once")
for j in jobs:
    print(f"[slurm-demo]   job {j['jobid']:>5} {j['state']:<10} {j['elapsed']} cpus={j['cpus']} "
          f"mem={j['mem']} {j['comment']}")
print(f"[slurm-demo] ingest JSONs equal (paths normalised): {', '.join(ingest)}" if not any(
    p.startswith("ingest") for p in problems) else "[slurm-demo] ingest JSONs differ")
print(f"[slurm-demo] scores.csv bitwise equal: {scores_bitwise}; identical too: "
      + ", ".join(f"{k}={v}" for k, v in extra.items()))
for n in notes:
    print(f"[slurm-demo] NOTE: {n}")
for p in problems:
    print(f"[slurm-demo] MISMATCH: {p}")
sys.exit(0 if not problems else 1)
PY
[ "$rc" = 0 ] && say "OK: Slurm and local runs made the same outputs (summary $WORK/summary.json)"
exit "$rc"
