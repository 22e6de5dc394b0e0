"""Rule register_filled: the filled series and per-date flags as STRDS in the pipeline's own mapset."""
import json
from pathlib import Path

import numpy as np

from stfuse import ingest, logs, register

logs.setup(snakemake.log[0])
load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
state = register.register_filled(
    load(snakemake.input.project), load(snakemake.input.optical), load(snakemake.input.sar),
    load(snakemake.input.cube)["dates"], np.load(snakemake.input.filled), np.load(snakemake.input.flags),
    checkpoint_sha=register.file_sha256(snakemake.input.model), config_sha=register.config_sha256(snakemake.config),
)
ingest.write_state(state, snakemake.output.state)
