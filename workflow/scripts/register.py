"""Rule register_filled: the filled series, per-date flags (and, with config train.uncertainty, the std),
stitched from the blocks, as STRDS in the pipeline's own mapset. STFUSE_COMMAND (set by common.smk in the Snakemake process that was started, inherited by
its jobs, also on Slurm) is the command recorded in the maps' history: not a param, so another command line
does not rerun the job."""
import os

from stfuse import ingest, logs
from stfuse.steps.register import register_step

logs.setup(snakemake.log[0])
state = register_step(snakemake.input.project, snakemake.input.optical, snakemake.input.sar, snakemake.input.meta,
                      snakemake.input.filled, snakemake.input.flags, snakemake.input.model, snakemake.config,
                      command=os.environ.get("STFUSE_COMMAND"), std_paths=snakemake.input.get("std"))
ingest.write_state(state, snakemake.output.state)
