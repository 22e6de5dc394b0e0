"""Checkpoint holdout: evaluation dates and the cells hidden on them (real cloud masks of other dates), and
whether the study's data support the benchmark at all (holdout.json: possible, reason)."""
from pathlib import Path

from stfuse import benchmark, logs

logs.setup(snakemake.log[0])
benchmark.holdout_step(Path(snakemake.input.cube).parent, snakemake.output.hidden, snakemake.output.info,
                       **snakemake.params.benchmark)
