"""Rule score_stats_block: the benchmark's first pass over one block's core (cell counts, SSIM fill parts,
the SAR regression's sufficient statistics), merged exactly by every score_block job."""
from pathlib import Path

from stfuse import logs
from stfuse.steps.score import score_stats_block_step

logs.setup(snakemake.log[0])
score_stats_block_step(Path(snakemake.input.cube).parent, snakemake.input.info, snakemake.output.stats,
                       truth_manifest=snakemake.input.truth[0] if snakemake.input.truth else None,
                       optical=snakemake.params.optical)
