"""Every shipped config parses and instantiates (model, solver, data module, trainer) without loading weights; the
``base:`` chains of the shipped configs resolve; the ``base:`` include and merge rules (lit_edit/cli.py)."""
import contextlib
import io
from pathlib import Path

import pytest
import yaml

from lit_edit.cli import BASE_KEY, ConfigBaseError, EditCLI, load_config, main, merge_configs
from lit_edit.data import EditDataModule, is_world_spec
from lit_edit.methods import MetaKE
from lit_edit.module import EditModule
from lit_edit.solvers import AlignedSolver

ROOT = Path(__file__).resolve().parent.parent / "configs"
BASES = ROOT / "_base"  # shared parts, named by a run config's base: chain, not run on their own
RUN_CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if BASES not in p.parents)
CONFIGS = RUN_CONFIGS + sorted((Path(__file__).resolve().parent / "configs").glob("*.yaml"))
OTE_WORLD = ("memit_naive", "alphaedit_naive", "prune", "prune_no_err", "rect", "rect_no_err", "memorize_latest")


def cli_for(path, *extra):
    return EditCLI(EditModule, EditDataModule, run=False, args=["--config", str(path), *extra],
                   save_config_kwargs={"overwrite": True})


def printed_config(*args) -> dict:
    """``train.py fit <args> --print_config``, parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def base_chain(path: Path) -> list[Path]:
    """The files a config's ``base:`` chain reads, the config first (asserts: each exists, none repeats)."""
    chain = [path.resolve()]
    while True:
        base = yaml.safe_load(chain[-1].read_text()).get(BASE_KEY)
        if base is None:
            return chain
        nxt = (chain[-1].parent / base).resolve()
        assert nxt.is_file(), f"{chain[-1]}: base {base} not found"
        assert nxt not in chain, f"base cycle: {chain + [nxt]}"
        chain.append(nxt)


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
        assert isinstance(cli.model.method, MetaKE) and cli.model.method.T == 15
    if is_world_spec(cli.model.model_name):  # C0 from the edited world's own corpus
        assert cli.model.stats_cfg.dataset == cli.model.model_name == cli.datamodule.path


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_base_chains_resolve_without_cycles(path):
    chain = base_chain(path)
    assert all(ROOT in p.parents for p in chain), chain  # a shipped config stands on shipped files only
    merged = load_config(path)
    assert BASE_KEY not in merged and merged, path


def test_every_base_file_is_used():
    used = {p for run in RUN_CONFIGS for p in base_chain(run)[1:]}
    assert set(BASES.glob("*.yaml")) <= used, sorted(set(BASES.glob("*.yaml")) - used)


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


def test_shipped_configs_keep_a_bounded_number_of_checkpoints():
    """Each checkpoint is flat in the number of edits (the solver's ledger is on disk, docs/algorithms.md §6.6), but a
    lifelong run takes many: every shipped config keeps at most three, the latest ones (top-k by step)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen = 0
    for path in RUN_CONFIGS:
        callbacks = (load_config(path).get("trainer") or {}).get("callbacks") or []
        (cb,) = [cb for cb in callbacks if cb["class_path"].endswith("ModelCheckpoint")]
        mc = ModelCheckpoint(**cb["init_args"])
        assert 1 <= mc.save_top_k <= 3, path  # -1 would keep every checkpoint
        if mc.save_top_k > 1:  # more than one kept: they must be the latest, not the first ones
            assert (mc.monitor, mc.mode) == ("step", "max"), path
        seen += 1
    assert seen == len(RUN_CONFIGS) >= 18


# -- the base: include, on small files ------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_merge_is_deep_for_mappings_and_whole_for_everything_else():
    base = {"a": {"b": {"c": 1, "d": 2}, "e": [1, 2, 3]}, "f": 1, "g": {"h": 1}}
    over = {"a": {"b": {"d": 20, "x": 5}, "e": [9]}, "g": None}
    assert merge_configs(base, over) == {"a": {"b": {"c": 1, "d": 20, "x": 5}, "e": [9]}, "f": 1, "g": None}
    assert base == {"a": {"b": {"c": 1, "d": 2}, "e": [1, 2, 3]}, "f": 1, "g": {"h": 1}}  # inputs untouched
    # a class_path node: init_args merge under the same class, the node is replaced when the class changes
    node = {"class_path": "m.A", "init_args": {"x": 1, "y": 2}}
    assert merge_configs({"s": node}, {"s": {"init_args": {"y": 3}}})["s"] == \
        {"class_path": "m.A", "init_args": {"x": 1, "y": 3}}
    assert merge_configs({"s": node}, {"s": {"class_path": "m.A", "init_args": {"y": 3}}})["s"] == \
        {"class_path": "m.A", "init_args": {"x": 1, "y": 3}}
    assert merge_configs({"s": node}, {"s": {"class_path": "m.B", "init_args": {"z": 0}}})["s"] == \
        {"class_path": "m.B", "init_args": {"z": 0}}


def test_base_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    write(tmp_path / "common" / "root.yaml", "model: {layers: [0, 1], method: {v_lr: 0.5, v_num_grad_steps: 40}}\n"
                                             "data: {limit: 200}\n")
    write(tmp_path / "common" / "mid.yaml", "base: root.yaml\nmodel: {method: {v_lr: 0.1}}\n")
    top = write(tmp_path / "runs" / "deep" / "top.yaml", "base: ../../common/mid.yaml\nmodel: {layers: [2]}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not the including file's directory
    assert load_config(top) == {"model": {"layers": [2], "method": {"v_lr": 0.1, "v_num_grad_steps": 40}},
                                "data": {"limit": 200}}
    absolute = write(tmp_path / "abs.yaml", f"base: {tmp_path / 'common' / 'mid.yaml'}\n")
    assert load_config(absolute)["model"]["method"] == {"v_lr": 0.1, "v_num_grad_steps": 40}


def test_a_missing_base_is_named_with_the_file_that_names_it(tmp_path, monkeypatch, capsys):
    write(tmp_path / "mid.yaml", "base: nowhere/gone.yaml\n")
    top = write(tmp_path / "top.yaml", "base: mid.yaml\n")
    with pytest.raises(ConfigBaseError, match=r"mid\.yaml: base file 'nowhere/gone\.yaml' not found"):
        load_config(top)
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(top), "--print_config"])
    err = capsys.readouterr().err
    assert "nowhere/gone.yaml" in err and "mid.yaml" in err


@pytest.mark.parametrize("files", [{"a.yaml": "base: a.yaml\n"},
                                   {"a.yaml": "base: sub/b.yaml\n", "sub/b.yaml": "base: ../c.yaml\n",
                                    "c.yaml": "base: a.yaml\n"}], ids=["self", "three"])
def test_a_base_cycle_is_refused(files, tmp_path, monkeypatch, capsys):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigBaseError, match="config base cycle: .*a.yaml -> .*a.yaml$"):
        load_config(tmp_path / "a.yaml")
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "a.yaml"), "--print_config"])
    assert "config base cycle" in capsys.readouterr().err


@pytest.mark.parametrize("text,named", [("base: 3\n", "base must be the path of a config file"),
                                        ("base: [a.yaml]\n", "base must be the path of a config file"),
                                        ("- 1\n", "must be a mapping")])
def test_a_malformed_base_is_refused(text, named, tmp_path):
    write(tmp_path / "bad.yaml", text)
    top = write(tmp_path / "top.yaml", "base: bad.yaml\n")
    with pytest.raises(ConfigBaseError, match=rf"bad\.yaml: .*{named}"):
        load_config(top)


def test_the_cli_parses_the_merged_file(tmp_path, monkeypatch):
    """Through ``train.py fit --config``: base values kept, overlay values win, lists replaced whole, a class switch
    drops the old class's init_args, quoted strings stay strings, the command line still wins over both files."""
    monkeypatch.setattr("sys.argv", ["train.py"])
    write(tmp_path / "base" / "b.yaml", """\
trainer:
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: base_name}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 5, save_top_k: -1, filename: "{step}"}
model:
  model: world
  layers: [0, 1]
  solver:
    class_path: lit_edit.solvers.AlphaEdit
    init_args: {L2: 10.0, nullspace_threshold: 5.0e-2}
  method: {class_path: lit_edit.methods.VStar, init_args: {v_num_grad_steps: 40, v_lr: 0.5}}
data: {limit: 200, split: "1e-3"}
""")
    write(tmp_path / "over.yaml", """\
base: base/b.yaml
trainer:
  logger: {init_args: {name: over_name}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 1}
model:
  layers: [2]
  solver: {init_args: {L2: 1.0}}
  method: {init_args: {v_lr: 0.1}}
""")
    switch = write(tmp_path / "switch.yaml", """\
base: over.yaml
model:
  solver:
    class_path: lit_edit.solvers.MEMIT
    init_args: {mom2_update_weight: 3000.0}
  method: {class_path: lit_edit.methods.MetaKE, init_args: {T: 15, base: {v_lr: 0.2}}}
""")
    cfg = printed_config("--config", str(tmp_path / "over.yaml"))
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "runs"
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "over_name"
    (cb,) = cfg["trainer"]["callbacks"]  # the overlay's list, not merged with the base's element
    assert cb["init_args"]["every_n_train_steps"] == 1 and cb["init_args"]["filename"] is None
    assert cb["init_args"]["save_top_k"] == 1  # ModelCheckpoint's default, not the base's -1
    m = cfg["model"]
    assert m["layers"] == [2] and m["method"]["init_args"]["v_lr"] == 0.1
    assert m["method"]["init_args"]["v_num_grad_steps"] == 40  # same class_path: init_args merged
    assert m["solver"]["class_path"] == "lit_edit.solvers.AlphaEdit"
    assert m["solver"]["init_args"]["L2"] == 1.0 and m["solver"]["init_args"]["nullspace_threshold"] == 0.05
    assert cfg["data"]["limit"] == 200 and cfg["data"]["split"] == "1e-3"

    cfg = printed_config("--config", str(switch), "--model.method.init_args.eta", "0.01", "--data.limit", "7")
    m = cfg["model"]
    assert m["solver"]["class_path"] == "lit_edit.solvers.MEMIT"
    assert m["solver"]["init_args"]["L2"] == 0.0  # MEMIT's default: AlphaEdit's L2 10 → 1 does not carry over
    assert m["solver"]["init_args"]["mom2_update_weight"] == 3000.0
    meta = m["method"]["init_args"]  # another class_path: the VStar node is replaced whole, nothing carries over
    assert m["method"]["class_path"] == "lit_edit.methods.MetaKE" and meta["T"] == 15 and meta["eta"] == 0.01
    base = meta["base"].get("init_args", meta["base"])
    assert base["v_lr"] == 0.2 and base["v_num_grad_steps"] == 20 and cfg["data"]["limit"] == 7

    # several --config files still stack as in LightningCLI, each one's base chain expanded first
    extra = write(tmp_path / "extra.yaml", "data: {batch_size: 3}\n")
    cfg = printed_config("--config", str(switch), "--config", str(extra))
    assert cfg["data"]["batch_size"] == 3 and cfg["model"]["solver"]["class_path"] == "lit_edit.solvers.MEMIT"


def test_deep_world_configs_meet_issue_19():
    """The deep world (issue 19) and its configs, without training it: at least 8 blocks, at least 4 of them after
    the configs' last edited layer, more subjects than edits and never-edited background subjects."""
    from lit_edit.world.spec import PRESETS

    spec = PRESETS["deep"]
    assert spec.n_layer >= 8
    assert spec.n_background > 0
    deep = sorted((ROOT / "world").glob("deep_*.yaml"))
    assert {p.stem for p in deep} >= {"deep_alphaedit", "deep_metake"}
    for path in deep:
        cfg = load_config(path)
        assert cfg["model"]["model"] == cfg["data"]["path"] == "world:deep", path
        layers = cfg["model"]["layers"]
        assert 0 < min(layers) and spec.n_layer - 1 - max(layers) >= 4, (path, layers)  # lower-middle, >= 4 after
        n_edits = cfg["data"]["limit"]
        assert spec.n_subjects > n_edits and spec.n_subjects - spec.n_background >= n_edits, path
        assert cfg["model"]["method"]["init_args"].get("fact_token", cfg["model"]["method"]["init_args"].get(
            "base", {}).get("fact_token")) == "subject_first", path


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_model_metake_configs_restate_their_bases_exactly(model):
    """A MetaKE config replaces the method (and metake_memit the solver) whole, so it restates settings of the
    configs it is compared with: its v* settings are alphaedit_counterfact.yaml's, metake_memit's solver is
    memit_counterfact.yaml's, and the ZsRE one differs from the CounterFact one only in its data and run name."""
    d = ROOT / model
    vstar = load_config(d / "alphaedit_counterfact.yaml")["model"]["method"]["init_args"]
    for name in ("metake_counterfact", "metake_memit_counterfact", "metake_zsre"):
        cfg = load_config(d / f"{name}.yaml")
        base = cfg["model"]["method"]["init_args"]["base"]
        for key, value in vstar.items():
            if key != "evaluator":
                assert base[key] == value, (name, key)
    assert load_config(d / "metake_memit_counterfact.yaml")["model"]["solver"] == \
        load_config(d / "memit_counterfact.yaml")["model"]["solver"]
    cf, zsre = load_config(d / "metake_counterfact.yaml"), load_config(d / "metake_zsre.yaml")
    assert cf["model"] == zsre["model"] and zsre["data"]["dataset"] == "zsre"
    assert zsre["data"]["path"] == load_config(d / "alphaedit_zsre.yaml")["data"]["path"]
