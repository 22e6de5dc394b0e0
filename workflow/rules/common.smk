# Config validation, paths and input functions shared by every stage.
from pathlib import Path

from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
BENCH = f"benchmarks/out/{STUDY}"
SENSORS = list(config["sensors"])
OPTICAL = [s for s, spec in config["sensors"].items() if spec["role"] == "optical"]
SAR = [s for s, spec in config["sensors"].items() if spec["role"] == "sar"]
INPUT = next(iter(config["input"]))

if len(OPTICAL) != 1 or len(SAR) != 1:
    raise ValueError(
        "config key sensors: need exactly one sensor with role optical and one with role sar, "
        f"got optical={OPTICAL} sar={SAR}"
    )
for _name, _spec in config["sensors"].items():
    if _spec["role"] == "optical" and "mask" not in _spec:
        raise ValueError(f"config key sensors.{_name}.mask: an optical sensor needs a mask band")
if INPUT == "manifest" and not Path(config["input"]["manifest"]).is_file():
    raise ValueError(f"config key input.manifest: {config['input']['manifest']} does not exist")

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
