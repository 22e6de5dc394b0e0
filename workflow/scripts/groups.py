"""Rule groups: one imagery group (i.group) per optical acquisition, channel order from semantic labels; a query
group per date config infer.dates asks for without an optical acquisition (SAR paired as config pairing says)."""
import json
from pathlib import Path

from stfuse import logs
from stfuse.steps.groups import groups_step

logs.setup(snakemake.log[0])
load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
groups_step(load(snakemake.input.project), load(snakemake.input.optical), load(snakemake.input.sar),
            Path(snakemake.input.pairs).parent, snakemake.output.groups, static=snakemake.params.static,
            dates=snakemake.params.dates, pairing=snakemake.params.pairing)
