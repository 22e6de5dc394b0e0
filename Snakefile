# stfuse: fill cloud gaps in Sentinel-2 with Sentinel-1 inside GRASS GIS.
# Thin on purpose: config and validation in common.smk, one rule file per stage.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/bridge.smk"


rule all:
    input:
        stage_targets("ingest"),
        stage_targets("tiles"),
    default_target: True
