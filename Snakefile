# stfuse: fill cloud gaps in Sentinel-2 with Sentinel-1 inside GRASS GIS.
# Thin on purpose: config and validation in common.smk, one rule file per stage.
import os

from snakemake.utils import min_version

min_version("9.0")

# The per-step conda envs (--sdm conda) pip-install stfuse from here; pip expands ${STFUSE_ROOT} there.
# (A write, not a variable the user must set: no envvars directive.)
os.environ.update(STFUSE_ROOT=workflow.basedir)


# The demo config, unless a study is given with --configfile (which would otherwise be merged into it).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


# The report (snakemake --report report.html) opens on what the workflow did.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/bridge.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        stage_targets("register"),
        stage_targets("benchmark"),
