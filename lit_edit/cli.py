"""``python train.py fit --config configs/...yaml`` (LightningCLI). A bare ``python train.py`` runs configs/default.yaml."""
from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lit_edit.data import EditDataModule
from lit_edit.module import EditModule
from lit_edit.runs import CHECKPOINTS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# loggers whose run directory is save_dir/name/version (a resume points them back at its checkpoint's directory)
_VERSIONED_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
                      "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")


class EditCLI(LightningCLI):
    """LightningCLI with the strictness an editing run needs.

    * Only ``fit`` is offered: an editing run is a fit; the other loops have no steps defined.
    * No abbreviated option names: ``--model.targets.v_num_grad_step`` is an error, not ``v_num_grad_steps``.
    * On ``--ckpt_path`` the command line and config files are what the run uses. (LightningCLI's default copies
      the checkpoint's hyper-parameters over them without a word.) ``EditModule.on_load_checkpoint`` then
      compares every setting that changes the result with the checkpoint's and stops on a difference.
    * A resumed run writes into its checkpoint's run directory (same ledger, TensorBoard run and metrics.json):
      the logger's save_dir/name/version are set from the checkpoint's path ``<run_dir>/checkpoints/<file>``.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's settings (see the class docstring)."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.config.get("subcommand") or "", None)
        if cfg is None or not cfg.get("ckpt_path"):
            return
        ckpt = Path(cfg["ckpt_path"]).expanduser().resolve()
        logger = cfg["trainer"].get("logger")
        if ckpt.parent.name != CHECKPOINTS or logger is None or isinstance(logger, (bool, list)):
            return
        if logger.get("class_path") in _VERSIONED_LOGGERS:
            run_dir = ckpt.parent.parent
            logger.init_args.save_dir = str(run_dir.parent.parent)
            logger.init_args.name = run_dir.parent.name
            logger.init_args.version = run_dir.name


def main(args: list[str] | None = None) -> LightningCLI:
    if args is None and len(sys.argv) == 1:
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    return EditCLI(EditModule, EditDataModule, save_config_kwargs={"overwrite": True},
                   seed_everything_default=0, args=args,
                   parser_kwargs={"allow_abbrev": False, "fit": {"allow_abbrev": False}})
