"""Rule score_block: every method on one block (core + the cells SSIM needs), the additive parts of each
metric over its core, and the block's quicklook pieces."""
from pathlib import Path

from stfuse import logs
from stfuse.steps.score import score_block_step

logs.setup(snakemake.log[0])
p = snakemake.params.benchmark
score_block_step(Path(snakemake.input.cube).parent, snakemake.input.info, list(snakemake.input.stats),
                 list(snakemake.input.heldout), list(snakemake.input.main), Path(snakemake.output.parts).parent,
                 data_range=p["data_range"], whittaker_lambda=p["whittaker_lambda"],
                 quicklook_dates=p["quicklook_dates"],
                 truth_manifest=snakemake.input.truth[0] if snakemake.input.truth else None,
                 optical=snakemake.params.optical, heldout_std=list(snakemake.input.get("heldout_std", [])))
