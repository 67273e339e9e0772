"""lit_edit: sequential knowledge editing of causal LLMs as a PyTorch Lightning fit loop."""
import os

# On small CPU machines OpenMP's default spin-waiting made forward passes ~50x slower in our
# measurements (0.5 s vs 0.01 s per step of the tiny world model). Must be set before torch starts
# its thread pool, so import lit_edit before torch (train.py does); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from lit_edit import Editor`` (the Python entry point, lit_edit.api), imported on first use: importing
    the package itself must stay light and must not start torch before OMP_WAIT_POLICY is set above."""
    if name in ("Editor", "EditResult"):
        from lit_edit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lit_edit' has no attribute {name!r}")
