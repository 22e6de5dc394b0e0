"""Optional dependencies: the model stages need PyTorch, nothing else in stfuse does."""

from __future__ import annotations

ML_EXTRA = "pip install 'stfuse[ml]'"


def require_torch(module: str):
    """``import torch`` for ``module``; without it, a ModuleNotFoundError that says what to install."""
    try:
        import torch
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"{module} needs PyTorch, which is not installed: {ML_EXTRA} (or install torch itself; "
            "make setup does). Ingest, pairing, groups, cubes, tiles and the classical baselines work without it.",
            name="torch") from None
    return torch
