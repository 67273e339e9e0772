"""Every shipped config parses and instantiates (model, solver, data module, trainer) without loading weights."""
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lit_edit.data import EditDataModule
from lit_edit.module import EditModule
from lit_edit.solvers import AlignedSolver

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml")) + sorted((Path(__file__).resolve().parent / "configs").glob("*.yaml"))
OTE_WORLD = ("memit_naive", "alphaedit_naive", "prune", "prune_no_err", "rect", "rect_no_err", "memorize_latest")


def cli_for(path):
    return LightningCLI(EditModule, EditDataModule, run=False, args=["--config", str(path)],
                        save_config_kwargs={"overwrite": True})


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers and checkpoints would write under ./runs
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = cli_for(path)
    assert isinstance(cli.model.solver, AlignedSolver)
    assert cli.model.llm is None  # weights load only in configure_model, at fit time
    if path.parent.name == "world" and path.stem in OTE_WORLD:
        assert cli.datamodule.limit == 1000 and cli.datamodule.batch_size == 50  # the OTE-SE protocol
        assert cli.datamodule.path == "world:large"  # 1000 distinct edited subjects
    if "metake" in path.stem:
        assert cli.model.metake_cfg is not None and cli.model.metake_cfg.T == 15


def test_ote_configs_select_the_variants_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])

    def solver(name):
        return cli_for(ROOT / "world" / f"{name}.yaml").model.solver

    assert solver("memit_naive").mode == "naive" and solver("alphaedit_naive").mode == "naive"
    assert solver("memorize_latest").mode == "memorize_latest"
    for name, reg, ec in [("prune", "prune", True), ("prune_no_err", "prune", False), ("rect", "rect", True),
                          ("rect_no_err", "rect", False)]:
        s = solver(name)
        assert (s.regularizer, s.error_correction) == (reg, ec), name
