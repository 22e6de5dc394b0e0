"""One function per workflow stage: each takes exactly the files its rule declares as inputs and writes
exactly the rule's outputs; the rule scripts under workflow/scripts/ only unpack ``snakemake`` and call it.

Pixel stages run per spatial block (:mod:`stfuse.blocks`) on block cubes (:mod:`stfuse.cube`).
"""
