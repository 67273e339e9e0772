"""``python train.py fit --config configs/...yaml`` (LightningCLI). A bare ``python train.py`` runs configs/default.yaml."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from jsonargparse import get_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_edit.callbacks import RunConfig
from lit_edit.data import EditDataModule
from lit_edit.module import EditModule
from lit_edit.runs import checkpoint_run_dir

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# loggers whose run directory is save_dir/name/version (a resume points them back at its checkpoint's directory)
_VERSIONED_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
                      "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")


BASE_KEY = "base"


class ConfigBaseError(ValueError):
    """A config's ``base:`` chain cannot be resolved (a missing file, a cycle, a value that is not a path)."""


def merge_configs(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, as a new dict: nested dicts merge key by key, the overlay winning; any other value
    (a list, a scalar, ``null``) replaces the base's whole. A ``class_path`` node whose ``class_path`` the overlay
    changes is replaced whole, so no ``init_args`` of the base's class leak into the new class."""
    out = dict(base)
    for key, value in overlay.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not (
                "class_path" in old and "class_path" in value and old["class_path"] != value["class_path"]):
            value = merge_configs(old, value)
        out[key] = value
    return out


def load_config(path: str | os.PathLike, loader=None, _chain: tuple[Path, ...] = ()) -> dict:
    """The config file at ``path`` with its ``base:`` chain expanded (see :class:`EditCLI`).

    ``base`` is a path relative to the file that names it (or absolute); the base is loaded the same way, so
    bases may have bases, and the file is merged over it with :func:`merge_configs`. ``loader`` turns YAML text
    into Python values (default: jsonargparse's YAML loader, as for any config). Raises :class:`ConfigBaseError`
    for a missing base (naming it and the file that names it), a cycle (naming the chain) or a file that does not
    read as a YAML mapping (naming it)."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigBaseError("config base cycle: " + " -> ".join(map(str, (*_chain, path))))
    try:
        cfg = (loader or get_loader("yaml"))(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigBaseError(f"{path}: {err}") from err
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigBaseError(f"{path}: a config file must be a mapping, got {type(cfg).__name__}")
    if BASE_KEY not in cfg:
        return cfg
    base = cfg.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigBaseError(f"{path}: {BASE_KEY} must be the path of a config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigBaseError(f"{path}: {BASE_KEY} file {base!r} not found (looked for {base_path})")
    return merge_configs(load_config(base_path, loader, (*_chain, path)), cfg)


class _QuotedStrDumper(yaml.SafeDumper):
    """Writes every string quoted, so that reading the text back with any YAML loader gives strings back."""


_QuotedStrDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"'))


class BaseResolvingParser(LightningArgumentParser):
    """Reads a config file with a top-level ``base:`` key as :func:`load_config` expands it, then parses the result
    as a config given as a string (so a jsonargparse ``Path``-typed value in it, of which lit_edit has none, is
    relative to the working directory); other files, and configs given as strings, as LightningArgumentParser."""

    def parse_path(self, path, ext_vars=None, env=None, defaults=True, **kwargs):
        file = Path(path) if isinstance(path, (str, os.PathLike)) else None
        if file is not None and file.is_file():
            loader = get_loader(self.parser_mode)
            cfg = loader(file.read_text())
            if isinstance(cfg, dict) and BASE_KEY in cfg:
                try:
                    merged = load_config(file, loader)
                except ConfigBaseError as err:
                    self.error(str(err))
                text = yaml.dump(merged, Dumper=_QuotedStrDumper, sort_keys=False, allow_unicode=True)
                return self.parse_string(text, path=file.name, ext_vars=ext_vars, env=env, defaults=defaults,
                                         **kwargs)
        return super().parse_path(path, ext_vars=ext_vars, env=env, defaults=defaults, **kwargs)


class EditCLI(LightningCLI):
    """LightningCLI with the strictness an editing run needs.

    * ``fit`` edits; ``test`` scores the stream on the unedited model, or with ``--ckpt_path`` on a checkpoint's
      edits, and writes the same outputs into a new run directory. ``validate`` and ``predict`` are not offered.
    * No abbreviated option names: ``--model.method.init_args.v_num_grad_step`` is an error, not ``v_num_grad_steps``.
    * On ``--ckpt_path`` the command line and config files are what the run uses. (LightningCLI's default copies
      the checkpoint's hyper-parameters over them without a word.) ``EditModule.on_load_checkpoint`` then
      compares every setting that changes the result with the checkpoint's and stops on a difference.
    * A resumed run writes into its checkpoint's run directory (same ledger, TensorBoard run and metrics.json):
      the logger's save_dir/name/version are set from the checkpoint's path ``<run_dir>/checkpoints/<file>``.
    * A config file may start from another: a top-level ``base: <path>`` (relative to the file that names it)
      loads that file first (itself perhaps with a base) and merges this one over it: nested mappings merge key
      by key, this file winning; lists and scalars replace the base's whole, ``null`` included; a ``class_path``
      node whose ``class_path`` changes is replaced whole. The result is parsed as if it were one file.
      (jsonargparse's own ``config: <path>`` key inside a file does load that file, but each group the including
      file then gives, e.g. ``model:``, replaces the loaded group whole; hence ``base:``.) A missing base or a
      cycle is an error naming the files.
    """

    def __init__(self, *args, parser_class: type[LightningArgumentParser] = BaseResolvingParser, **kwargs) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"], "test": LightningCLI.subcommands()["test"]}

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's settings (see the class docstring)."""

    def before_instantiate_classes(self) -> None:
        if self.config.get("subcommand") != "fit":  # a test writes its own run directory
            return
        cfg = self.config.get("fit", None)
        if cfg is None or not cfg.get("ckpt_path"):
            return
        run_dir = checkpoint_run_dir(Path(cfg["ckpt_path"]).expanduser(), None)  # None unless <run_dir>/checkpoints/
        logger = cfg["trainer"].get("logger")
        if run_dir is None or logger is None or isinstance(logger, (bool, list)):
            return
        if logger.get("class_path") in _VERSIONED_LOGGERS:
            logger.init_args.save_dir = str(run_dir.parent.parent)
            logger.init_args.name = run_dir.parent.name
            logger.init_args.version = run_dir.name


def main(args: list[str] | None = None) -> LightningCLI:
    if args is None and len(sys.argv) == 1:
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "trace":  # causal tracing (lit_edit/trace.py): its own parser, not a Lightning loop
        from lit_edit.trace import main as trace_main

        return trace_main(argv[1:])
    # config.yaml is written once the run's checks have passed and its directory is claimed (RunConfig)
    return EditCLI(EditModule, EditDataModule, save_config_callback=RunConfig,
                   seed_everything_default=0, args=args,
                   parser_kwargs={"allow_abbrev": False, "fit": {"allow_abbrev": False},
                                  "test": {"allow_abbrev": False}})
