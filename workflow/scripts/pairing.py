"""Rule pairing: each optical granule with its nearest SAR granule(s); optical neighbours; clear fractions."""
import json
from pathlib import Path

from stfuse import logs
from stfuse.steps.pairing import pairing_step

logs.setup(snakemake.log[0])
load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
pairing_step(load(snakemake.input.project), load(snakemake.input.optical), load(snakemake.input.sar),
             Path(snakemake.output.pairs).parent, **snakemake.params.pairing)
