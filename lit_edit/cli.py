"""``python train.py fit --config configs/...yaml`` (LightningCLI). A bare ``python train.py`` runs configs/default.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lit_edit.data import EditDataModule
from lit_edit.module import EditModule

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def main(args: list[str] | None = None) -> LightningCLI:
    if args is None and len(sys.argv) == 1:
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    return LightningCLI(EditModule, EditDataModule, save_config_kwargs={"overwrite": True},
                        seed_everything_default=0, args=args)
