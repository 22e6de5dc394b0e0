"""Rule score: the blocks' partial scores merged into the benchmark table, summary and figures; or, when the
holdout checkpoint found the benchmark impossible, outputs that say why."""
from pathlib import Path

from stfuse import logs
from stfuse.steps.score import score_step

logs.setup(snakemake.log[0])
p = snakemake.params.benchmark
score_step([Path(s).parent for s in snakemake.input.parts], list(snakemake.input.stats), snakemake.input.info,
           snakemake.input.meta, Path(snakemake.output.scores).parent, data_range=p["data_range"],
           whittaker_lambda=p["whittaker_lambda"], quicklook_dates=p["quicklook_dates"],
           uncertainty=snakemake.params.uncertainty)
