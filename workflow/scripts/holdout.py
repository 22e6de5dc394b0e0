"""Checkpoint holdout: evaluation dates and, for each, the donor date whose real cloud mask is transplanted
onto it, decided from the blocks' cell counts (no pixel read); and whether the study's data support the
benchmark at all (holdout.json: possible, reason, donors)."""
from stfuse import logs
from stfuse.steps.score import holdout_step

logs.setup(snakemake.log[0])
holdout_step(snakemake.input.meta, snakemake.output.info, **snakemake.params.benchmark)
