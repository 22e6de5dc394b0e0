"""stfuse: fill cloud gaps in optical satellite time series with SAR, inside GRASS GIS.

The library is the API; the Snakemake workflow is a thin layer of rules over it. Nothing in this
package imports Snakemake.
"""

__version__ = "0.1.0"
