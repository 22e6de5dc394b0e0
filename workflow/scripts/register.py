"""Rule register_filled: the filled series and per-date flags, stitched from the blocks, as STRDS in the
pipeline's own mapset."""
from stfuse import ingest, logs
from stfuse.steps.register import register_step

logs.setup(snakemake.log[0])
state = register_step(snakemake.input.project, snakemake.input.optical, snakemake.input.sar, snakemake.input.meta,
                      snakemake.input.filled, snakemake.input.flags, snakemake.input.model, snakemake.config)
ingest.write_state(state, snakemake.output.state)
