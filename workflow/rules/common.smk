# Config validation, paths and input functions shared by every stage.
from pathlib import Path

from snakemake.utils import validate

import stfuse.config


validate(config, schema="../schemas/config.schema.yaml")
stfuse.config.check(config)  # every DAG-time check beyond the schema, each naming its config key
if "grass_project" in config["input"]:
    import stfuse.existing

    stfuse.existing.check_config(config)  # the user's STRDS are read as they are: no scale/offset/nodata

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


def hidden_cells(wildcards):
    """The benchmark's hidden cells, for the heldout variant only."""
    return [f"{RESULTS}/heldout/hidden.npy"] if wildcards.variant == "heldout" else []


def synthetic_truth_manifest(wildcards):
    return [f"{RESULTS}/scene/truth/manifest.csv"] if INPUT == "synthetic" else []


wildcard_constraints:
    variant="main|heldout",


def stage_targets(stage):
    """The files that make up a stage; `rule <stage>` and `rule all` request them."""
    targets = {
        "ingest": [f"{RESULTS}/ingest/{s}.json" for s in SENSORS],
        "pairing": [f"{RESULTS}/pairing/pairs.csv"],
        "groups": [f"{RESULTS}/groups/groups.json"],
        "tiles": [f"{RESULTS}/main/tiles/index.csv"],
        "train": [f"{RESULTS}/main/model/model.pt"],
        "infer": [f"{RESULTS}/main/infer/filled.npy"],
        "register": [f"{RESULTS}/register/filled.json"],
        "benchmark": [f"{RESULTS}/benchmark/summary.md"],
    }
    return targets[stage]


def benchmark_possible(wildcards=None):
    """The holdout checkpoint's decision: do the study's data support the benchmark? (holdout.json)"""
    import json

    return json.loads(Path(checkpoints.holdout.get().output.info).read_text())["possible"]


def scored_variants(wildcards):
    """score's model inputs: the heldout and main filled series, only when the benchmark is possible (so
    the heldout variant is never trained for nothing)."""
    if not benchmark_possible(wildcards):
        return {}
    return {"heldout": f"{RESULTS}/heldout/infer/filled.npy", "main": f"{RESULTS}/main/infer/filled.npy"}
