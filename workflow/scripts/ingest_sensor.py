"""Rule ingest_sensor: one STRDS per sensor (and a validity STRDS for the optical one)."""
import json

from stfuse import existing, ingest, logs

logs.setup(snakemake.log[0])
project = json.loads(open(snakemake.input.project).read())
sensor = snakemake.wildcards.sensor
spec = snakemake.params.sensors[sensor]
if project["source"] == "grass_project":
    state = existing.ingest_sensor(project, sensor, spec)
else:
    state = ingest.ingest_sensor(project, snakemake.params.checked, sensor, spec)
ingest.write_state(state, snakemake.output.state)
