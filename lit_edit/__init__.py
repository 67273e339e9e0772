"""lit_edit: sequential knowledge editing of causal LLMs as a PyTorch Lightning fit loop."""

__version__ = "0.1.0"
