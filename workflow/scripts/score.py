"""Rule score: the blocks' partial scores merged into the benchmark table, summary and figures; or, when the
holdout checkpoint found the benchmark impossible, outputs that say why."""
import json
from pathlib import Path

from stfuse import benchmark, logs
from stfuse.steps.score import score_step

logs.setup(snakemake.log[0])
p = snakemake.params.benchmark
holdout = json.loads(Path(snakemake.input.info).read_text())
out_dir = Path(snakemake.output.scores).parent
if not holdout["possible"]:
    benchmark.not_possible_step(out_dir, holdout)
else:
    score_step([Path(s).parent for s in snakemake.input.parts], snakemake.input.info, snakemake.input.meta,
               out_dir, data_range=p["data_range"], whittaker_lambda=p["whittaker_lambda"],
               quicklook_dates=p["quicklook_dates"])
