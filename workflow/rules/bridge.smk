# Stages 2-4: cross-sensor pairing, imagery groups, tile export. The rule names are the stage targets
# (snakemake --cores 2 pairing | groups | tiles).


rule pairing:
    input:
        project=f"{RESULTS}/ingest/project.json",
        optical=f"{RESULTS}/ingest/{OPTICAL[0]}.json",
        sar=f"{RESULTS}/ingest/{SAR[0]}.json",
    output:
        pairs=f"{RESULTS}/pairing/pairs.csv",
        unpaired=f"{RESULTS}/pairing/unpaired.csv",
        neighbours=f"{RESULTS}/pairing/neighbours.csv",
        optical=f"{RESULTS}/pairing/optical.csv",
        sar=f"{RESULTS}/pairing/sar.csv",
        summary=f"{RESULTS}/pairing/pairing.json",
    log:
        f"{LOGS}/pairing/pairing.log",
    benchmark:
        f"{BENCH}/pairing/pairing.tsv"
    params:
        pairing=section("pairing"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/grass.yaml"
    script:
        "../scripts/pairing.py"


rule groups:
    input:
        project=f"{RESULTS}/ingest/project.json",
        optical=f"{RESULTS}/ingest/{OPTICAL[0]}.json",
        sar=f"{RESULTS}/ingest/{SAR[0]}.json",
        pairs=f"{RESULTS}/pairing/pairs.csv",
        static=[s["file"] for s in config["static"]],
    output:
        groups=f"{RESULTS}/groups/groups.json",
    log:
        f"{LOGS}/groups/groups.log",
    benchmark:
        f"{BENCH}/groups/groups.tsv"
    params:
        static=section("static"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/grass.yaml"
    script:
        "../scripts/groups.py"


rule cube:
    input:
        project=f"{RESULTS}/ingest/project.json",
        groups=f"{RESULTS}/groups/groups.json",
    output:
        cube=f"{RESULTS}/cube/cube.npy",
        meta=f"{RESULTS}/cube/cube.json",
    log:
        f"{LOGS}/cube/cube.log",
    benchmark:
        f"{BENCH}/cube/cube.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/grass.yaml"
    script:
        "../scripts/cube.py"


rule export_tiles:
    input:
        cube=f"{RESULTS}/cube/cube.npy",
        hidden=hidden_cells,
    output:
        tiles=f"{RESULTS}/{{variant}}/tiles/tiles.npy",
        index=f"{RESULTS}/{{variant}}/tiles/index.csv",
        channels=f"{RESULTS}/{{variant}}/tiles/channels.json",
        stats=f"{RESULTS}/{{variant}}/tiles/stats.json",
    log:
        f"{LOGS}/{{variant}}/tiles.log",
    benchmark:
        f"{BENCH}/{{variant}}/tiles.tsv"
    params:
        tiles=section("tiles"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/grass.yaml"
    script:
        "../scripts/tiles.py"


rule tiles:
    input:
        stage_targets("tiles"),
