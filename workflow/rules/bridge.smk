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
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        pairing=section("pairing"),
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
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        static=section("static"),
        dates=section("infer", "dates"),
        pairing=section("pairing"),
    script:
        "../scripts/groups.py"


rule cube_block:
    input:
        project=f"{RESULTS}/ingest/project.json",
        groups=f"{RESULTS}/groups/groups.json",
    output:
        cube=f"{RESULTS}/blocks/{{block}}/cube/cube.npy",
        meta=f"{RESULTS}/blocks/{{block}}/cube/cube.json",
    log:
        f"{LOGS}/blocks/{{block}}/cube.log",
    benchmark:
        f"{BENCH}/blocks/{{block}}/cube.tsv"
    group:
        "cube"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        blocks=section("blocks"),
        tile_size=TILE_SIZE,
    script:
        "../scripts/cube.py"


rule cube:
    input:
        stage_targets("cube"),


rule tiles_block:
    input:
        cube=f"{RESULTS}/blocks/{{block}}/cube/cube.npy",
        meta=f"{RESULTS}/blocks/{{block}}/cube/cube.json",
        holdout=holdout_info,
    output:
        tiles=f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/tiles.npy",
        index=f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/index.csv",
        clear_fraction=f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/clear_fraction.npy",
        moments=f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/moments.npz",
        summary=f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/tiles.json",
    log:
        f"{LOGS}/{{variant}}/blocks/{{block}}/tiles.log",
    benchmark:
        f"{BENCH}/{{variant}}/blocks/{{block}}/tiles.tsv"
    group:
        "tiles"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        tiles=section("tiles"),
    script:
        "../scripts/tiles_block.py"


rule tile_store:
    input:
        index=per_block(f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/index.csv"),
        clear_fraction=per_block(
            f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/clear_fraction.npy"
        ),
        moments=per_block(f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/moments.npz"),
        summary=per_block(f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/tiles.json"),
    output:
        index=f"{RESULTS}/{{variant}}/tiles/index.csv",
        clear_fraction=f"{RESULTS}/{{variant}}/tiles/clear_fraction.npy",
        channels=f"{RESULTS}/{{variant}}/tiles/channels.json",
        stats=f"{RESULTS}/{{variant}}/tiles/stats.json",
    log:
        f"{LOGS}/{{variant}}/tile_store.log",
    benchmark:
        f"{BENCH}/{{variant}}/tile_store.tsv"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        tiles=section("tiles"),
    script:
        "../scripts/tile_store.py"


rule tiles:
    input:
        stage_targets("tiles"),
