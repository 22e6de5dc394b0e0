# Config validation, paths and input functions shared by every stage.
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

import stfuse.config

validate(config, schema="../schemas/config.schema.yaml")
stfuse.config.check(
    config
)  # every DAG-time check beyond the schema, each naming its config key
if "grass_project" in config["input"]:
    import stfuse.existing

    stfuse.existing.check_config(
        config
    )  # the user's STRDS are read as they are: no scale/offset/nodata

# The command as the user typed it, for the lineage of the filled series (register.py); setdefault: a job's own
# Snakemake process (Slurm) inherits the first one.
os.environ.setdefault("STFUSE_COMMAND", shlex.join(["snakemake", *sys.argv[1:]]))

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
BENCH = f"benchmarks/out/{STUDY}"
SENSORS = list(config["sensors"])
OPTICAL = [s for s, spec in config["sensors"].items() if spec["role"] == "optical"]
SAR = [s for s, spec in config["sensors"].items() if spec["role"] == "sar"]
INPUT = next(iter(config["input"]))

# An optical sensor without `mask` (or `mask: null`) is valid wherever every band has data.

# The pipeline's own GRASS project (manifest or synthetic input) or the user's (grass_project input).
if INPUT == "grass_project":
    GRASS_PROJECT = str(Path(config["input"]["grass_project"]["path"]).resolve())
else:
    GRASS_PROJECT = str(Path(RESULTS, "grassdata", STUDY).resolve())


# --- transfer: train.model naming a checkpoint (an inference-only study: train_model adopts it, no training)
# and train.init_from (a checkpoint to fine-tune); the files are checked here, their channels by the job.


def _train_checkpoint(key):
    """The checkpoint file config key train.<key> names, checked to exist; None when it names none."""
    value = (config.get("train") or {}).get(key)
    if value is None or (key == "model" and not stfuse.config.is_checkpoint(value)):
        return None
    path = Path(value)
    if not path.is_file():
        detail = (
            ""
            if path.is_absolute()
            else f" (tried {path.resolve()}: a relative path is taken from the working directory {os.getcwd()})"
        )
        raise ValueError(
            f"config key train.{key}: checkpoint {value} does not exist{detail}"
        )
    rel = os.path.relpath(path.resolve(), Path(RESULTS).resolve())
    if Path(rel).parts[:2] in (
        ("main", "model"),
        ("heldout", "model"),
    ):  # would be its own input
        raise ValueError(
            f"config key train.{key}: {value} is a model of this study ({RESULTS}); name another study's "
            "checkpoint, or a copy of it outside results/"
        )
    return str(value)


TRAIN_CHECKPOINT = _train_checkpoint("model")
INIT_FROM = _train_checkpoint("init_from")
if TRAIN_CHECKPOINT and INIT_FROM:
    raise ValueError(
        f"config keys train.model and train.init_from: train.model names a checkpoint ({TRAIN_CHECKPOINT}), so "
        "the study is inference-only and trains nothing to initialise from train.init_from; set one of the two"
    )


def _uncertainty_head():
    """The uncertainty head the study's model has: an adopted checkpoint's own (read here, so an
    inference-only study never needs train.uncertainty to match it), else config train.uncertainty.
    """
    if TRAIN_CHECKPOINT:
        try:
            import torch
        except (
            ImportError
        ):  # no torch where Snakemake runs: trust the config (the job checks)
            pass
        else:
            ckpt = torch.load(TRAIN_CHECKPOINT, map_location="cpu", weights_only=True)
            return str(ckpt.get("uncertainty") or "none")
    return (config.get("train") or {}).get("uncertainty", "none")


UNCERTAINTY = _uncertainty_head()


def train_checkpoint_files(wildcards):
    """train_model's checkpoint inputs (the adopted or the init file): a newer file reruns the job."""
    return [p for p in (TRAIN_CHECKPOINT, INIT_FROM) if p]


def section(*keys):
    """A config section with keys in sorted order, so that reordering a YAML file never looks like a
    params change to Snakemake (it compares params as text)."""

    def canon(value):
        if isinstance(value, dict):
            return {k: canon(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [canon(v) for v in value]
        return value

    value = config
    for key in keys:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return canon(value)


def manifest_file(wildcards=None):
    """The manifest ingest reads: the generated demo scene's, or the user's."""
    if INPUT == "synthetic":
        return f"{RESULTS}/scene/manifest.csv"
    if INPUT == "manifest":
        return config["input"]["manifest"]
    return []


def holdout_info(wildcards):
    """The benchmark's holdout decision (evaluation dates and their donor masks), for the heldout variant."""
    return [f"{RESULTS}/heldout/holdout.json"] if wildcards.variant == "heldout" else []


# --- spatial blocks: every pixel stage runs once per block (stfuse.blocks) ------------------------------

TILE_SIZE = section("tiles").get("size", 32)


def _plan_region():
    """The region's rows and columns: from the config when it fixes them (a synthetic scene, an explicit
    region: planned without running anything), else from the ingest_project checkpoint's project.json.
    """
    import json

    known = stfuse.config.region_size(config)
    if known:
        return dict(cols=known[0], rows=known[1])
    return json.loads(Path(checkpoints.ingest_project.get().output.state).read_text())[
        "region"
    ]


def block_plan():
    import stfuse.blocks

    return stfuse.blocks.study_plan(_plan_region(), section("blocks"), TILE_SIZE)


def block_ids():
    return [b.id for b in block_plan()]


def per_block(pattern, **kw):
    """An input function: ``pattern`` (with {block} and the job's own wildcards) for every block."""

    def expand_blocks(wildcards):
        own = {
            k: v for k, v in wildcards.items() if k != "block"
        }  # a block job asking for every block
        return [pattern.format(**own, **kw, block=b) for b in block_ids()]

    return expand_blocks


wildcard_constraints:
    block=r"r\d{4}c\d{4}",


def synthetic_truth_manifest(wildcards):
    return [f"{RESULTS}/scene/truth/manifest.csv"] if INPUT == "synthetic" else []


def main_filled_for_truth(wildcards):
    """The main model's filled blocks, which only the synthetic truth's protocol (real clouds) scores: a real
    site's benchmark then needs the heldout model alone, not a second training."""
    if INPUT != "synthetic":
        return []
    return per_block(f"{RESULTS}/main/blocks/{{block}}/infer/filled.npy")(wildcards)


wildcard_constraints:
    variant="main|heldout",


def stage_targets(stage):
    """The files that make up a stage; `rule <stage>` and `rule all` request them."""
    targets = {
        "ingest": [f"{RESULTS}/ingest/{s}.json" for s in SENSORS],
        "pairing": [f"{RESULTS}/pairing/pairs.csv"],
        "groups": [f"{RESULTS}/groups/groups.json"],
        "cube": per_block(f"{RESULTS}/blocks/{{block}}/cube/cube.json"),
        "tiles": [f"{RESULTS}/main/tiles/index.csv"],
        "train": [f"{RESULTS}/main/model/model.pt"],
        "infer": per_block(f"{RESULTS}/main/blocks/{{block}}/infer/filled.npy"),
        "register": [f"{RESULTS}/register/filled.json"],
        # summary.rst too: the report's landing page includes it (a run scored before it existed makes it)
        "benchmark": [
            f"{RESULTS}/benchmark/summary.md",
            f"{RESULTS}/benchmark/summary.rst",
        ],
    }
    return targets[stage]


def benchmark_possible(wildcards=None):
    """The holdout checkpoint's decision: do the study's data support the benchmark? (holdout.json)"""
    import json

    return json.loads(Path(checkpoints.holdout.get().output.info).read_text())[
        "possible"
    ]


def scored_blocks(wildcards):
    """score's inputs: every block's partial scores, only when the benchmark is possible (so the heldout
    variant is never trained for nothing)."""
    if not benchmark_possible(wildcards):
        return []
    return per_block(f"{RESULTS}/benchmark/blocks/{{block}}/parts.npz")(wildcards)


def scored_blocks_stats(wildcards):
    """Every block's first pass of the benchmark, when it is possible."""
    if not benchmark_possible(wildcards):
        return []
    return per_block(f"{RESULTS}/benchmark/blocks/{{block}}/stats.npz")(wildcards)
