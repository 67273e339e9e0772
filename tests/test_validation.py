"""Every hyper-parameter is checked when its object is built: a non-finite or out-of-range number, a bool given as a
number or an unknown option is refused at construction with a ValueError that names the setting as the YAML config
spells it, the value and the allowed range (not as a no-op run or a failure at the first step)."""
import math
from pathlib import Path

import pytest

from lit_edit import checks
from lit_edit.metake import MetaKEConfig
from lit_edit.muke import WindowConfig
from lit_edit.solvers import MEMIT, AlignedSolver, AlphaEdit
from lit_edit.stats import StatsConfig
from lit_edit.targets import TargetConfig

NAN, INF = math.nan, math.inf

SOLVER_CASES = {
    MEMIT: [
        ("mom2_update_weight", NAN), ("mom2_update_weight", INF), ("mom2_update_weight", -1.0),
        ("mom2_update_weight", True), ("mom2_update_weight", "15000"),
        ("L2", NAN), ("L2", INF), ("L2", -1.0), ("L2", True),
        ("rect_keep", NAN), ("rect_keep", 0.0), ("rect_keep", -5.0), ("rect_keep", 100.5), ("rect_keep", True),
        ("fold_every", 0), ("fold_every", -1), ("fold_every", 2.5), ("fold_every", True),
        ("mode", "sequential"), ("mode", "Aligned"), ("regularizer", "PRUNE"), ("regularizer", "none"),
        ("on_conflict", "overwrite"), ("error_correction", "false"), ("keep_ledger", 1),
    ],
    AlphaEdit: [
        ("L2", INF), ("L2", NAN), ("L2", 0.0), ("L2", 0), ("L2", -1.0), ("L2", True),
        ("nullspace_threshold", NAN), ("nullspace_threshold", INF), ("nullspace_threshold", 0.0),
        ("nullspace_threshold", -1e-3), ("mom2_update_weight", INF), ("mom2_update_weight", -1.0),
        ("mode", "naïve"), ("fold_every", 0), ("on_conflict", None), ("keep_ledger", "yes"),
    ],
    AlignedSolver: [
        ("projector", "null"), ("projector", None), ("nullspace_threshold", NAN), ("rect_keep", INF),
        ("L2", -INF),
    ],
}

CONFIG_CASES = {
    (TargetConfig, "model.method.init_args"): [
        ("v_num_grad_steps", 0), ("v_num_grad_steps", -3), ("v_num_grad_steps", 2.5), ("v_num_grad_steps", True),
        ("v_lr", NAN), ("v_lr", INF), ("v_lr", 0.0), ("v_lr", -0.5), ("v_lr", True),
        ("v_weight_decay", NAN), ("v_weight_decay", INF), ("v_weight_decay", -1e-3),
        ("clamp_norm_factor", NAN), ("clamp_norm_factor", INF), ("clamp_norm_factor", 0.0), ("clamp_norm_factor", -1.0),
        ("kl_factor", NAN), ("kl_factor", INF), ("kl_factor", -0.0625), ("kl_factor", False),
        ("kl_direction", "forward"), ("early_stop_loss", NAN), ("early_stop_loss", INF), ("early_stop_loss", -0.05),
        ("fact_token", "subjct_last"), ("fact_token", "first"), ("fact_token", None),
        ("kl_prompt", "is a"), ("kl_prompt", "{} is {}"), ("kl_prompt", "Of{} is a"), ("kl_prompt", None),
        ("legacy_bos_shift", "false"), ("chunk_size", -1), ("chunk_size", True), ("chunk_size", 1.5),
    ],
    (MetaKEConfig, "model.method.init_args"): [
        ("T", -1), ("T", 2.5), ("T", True), ("eta", NAN), ("eta", INF), ("eta", 0.0), ("eta", -5e-3), ("eta", True),
        ("w_edit", NAN), ("w_edit", -1.0), ("w_loc", INF), ("w_loc", -0.5), ("w_anchor", NAN), ("w_anchor", -1.0),
        ("w_anchor", True), ("tol", NAN), ("tol", INF), ("tol", -1e-3),
        ("bilevel", "meta"), ("bilevel", None), ("optimizer", "SGD"), ("gate", "structure"), ("feedback", "none"),
        ("kl_direction", "forward"), ("edit_prompts", "prefixed"), ("loc_prompt", "{} {}"), ("loc_prompt", "is a"),
        ("proxy_fidelity", 1),
    ],
    (WindowConfig, "model.method.init_args"): [
        ("method", "unke"), ("coefficients", "affinity"), ("affinity_pairing", "reversed"), ("on_mismatch", "ignore"),
        ("template", "llama"), ("metric_style", "bleu"),
        ("window_size", 0), ("window_size", True), ("window_size", 2.5), ("v_num_grad_steps", 0),
        ("v_num_grad_steps", True), ("v_lr", NAN), ("v_lr", 0.0), ("v_lr", INF), ("clamp_norm_factor", INF),
        ("clamp_norm_factor", 0.0), ("clamp_norm_factor", NAN), ("v_weight_decay", -1e-3), ("v_weight_decay", NAN),
        ("early_stop_loss", NAN), ("early_stop_loss", -1.0), ("affinity_steps", 0), ("affinity_steps", True),
        ("preservation", "yes"), ("chat", 0),
    ],
    (StatsConfig, "model.stats"): [
        ("n_samples", 0), ("n_samples", -5), ("n_samples", True), ("n_samples", 1.5e5), ("max_length", 0),
        ("max_length", INF), ("batch_tokens", 0), ("batch_tokens", True), ("dtype", "fp32"), ("dtype", "float8"),
        ("dtype", "int64"), ("shuffle_seed", -1), ("shuffle_seed", True), ("shuffle_seed", 1.5), ("dataset", ""),
        ("split", None), ("text_field", "  "), ("config_name", 3),
    ],
}


def _id(field, value):
    return f"{field}={value!r}"


@pytest.mark.parametrize("cls,field,value", [(c, f, v) for c, cases in SOLVER_CASES.items() for f, v in cases],
                         ids=[f"{c.__name__}-{_id(f, v)}" for c, cases in SOLVER_CASES.items() for f, v in cases])
def test_solver_refuses_bad_argument(cls, field, value):
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    msg = str(err.value)
    assert f"solver {cls.__name__}: {field} must be " in msg, msg
    assert f"got {value!r}" in msg, msg
    assert f"(model.solver.init_args.{field}" in msg, msg


@pytest.mark.parametrize("cls,where,field,value", [(c, w, f, v) for (c, w), cases in CONFIG_CASES.items()
                                                   for f, v in cases],
                         ids=[f"{c.__name__}-{_id(f, v)}" for (c, _), cases in CONFIG_CASES.items() for f, v in cases])
def test_config_refuses_bad_field(cls, where, field, value):
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{where}.{field} must be "), msg
    assert f"got {value!r}" in msg, msg


def test_messages_state_the_allowed_range():
    with pytest.raises(ValueError, match=r"^model\.method\.init_args\.v_lr must be a finite number > 0, got nan$"):
        TargetConfig(v_lr=NAN)
    with pytest.raises(ValueError, match=r"^solver AlphaEdit: L2 must be a finite number > 0, got inf "
                                         r"\(model\.solver\.init_args\.L2"):
        AlphaEdit(L2=INF)
    with pytest.raises(ValueError, match=r"^solver MEMIT: L2 must be a finite number >= 0, got inf "
                                         r"\(model\.solver\.init_args\.L2\)$"):
        MEMIT(L2=INF)
    with pytest.raises(ValueError, match=r"^solver MEMIT: rect_keep must be a finite number in \(0, 100\], got 0"):
        MEMIT(rect_keep=0)
    with pytest.raises(ValueError, match=r"^model\.method\.init_args\.fact_token must be one of 'subject_last', 'subject_first', "
                                         r"'subject_first_after_last', 'last', got 'subjct_last'$"):
        TargetConfig(fact_token="subjct_last")
    with pytest.raises(ValueError, match=r"^solver MEMIT: regularizer must be one of null, 'prune', 'rect', got 'none'"):
        MEMIT(regularizer="none")
    with pytest.raises(ValueError, match=r"^model\.stats\.n_samples must be an integer >= 1, got True$"):
        StatsConfig(n_samples=True)


def test_zero_preservation_and_zero_ridge_is_refused_at_construction():
    """λ = α = 0 makes A_0 = λ·PᵀC0P + α·I the zero matrix: refused when the solver is built, for either projector."""
    for make in (lambda: MEMIT(mom2_update_weight=0.0), lambda: AlphaEdit(L2=0.0),
                 lambda: AlignedSolver(mom2_update_weight=0, L2=0, projector="nullspace")):
        with pytest.raises(ValueError, match=r"L2 must be a finite number > 0, got 0.*not positive definite"):
            make()


# -- valid settings construct -------------------------------------------------------------------------------------

def test_defaults_are_valid():
    for cls in (MEMIT, AlphaEdit, AlignedSolver, TargetConfig, MetaKEConfig, WindowConfig, StatsConfig):
        cls()


def test_valid_solvers_construct():
    # ints where floats are expected, the boundaries of every range
    MEMIT(mom2_update_weight=15000, L2=0, regularizer="rect", rect_keep=100, error_correction=True, on_conflict="keep",
          keep_ledger=False, fold_every=1)
    MEMIT(mom2_update_weight=0.0, L2=1.0, mode="naive", regularizer="prune")
    AlphaEdit(L2=1, nullspace_threshold=1e-9, mode="memorize_latest", mom2_update_weight=0.5, on_conflict="error")
    AlphaEdit(L2=0.0, mom2_update_weight=2.0)  # λ > 0 carries A_0; setup checks that λ·PᵀC0P is positive definite
    AlignedSolver(mom2_update_weight=2.0, L2=0.3, projector="nullspace", nullspace_threshold=1e-2, rect_keep=0.5)


def test_valid_target_config_constructs():
    cfg = TargetConfig(v_num_grad_steps=1, v_lr=1, v_weight_decay=0, clamp_norm_factor=4, kl_factor=0,
                       kl_direction="ref_current", early_stop_loss=0, fact_token="last", kl_prompt="{}",
                       legacy_bos_shift=True, chunk_size=0)
    assert cfg.v_lr == 1
    for token in ("subject_last", "subject_first", "subject_first_after_last", "last"):
        TargetConfig(fact_token=token, kl_prompt="The {} is a")


def test_valid_metake_config_constructs():
    MetaKEConfig(bilevel="none", T=0, eta=1, optimizer="adam", gate="key_only", feedback="stop_grad", w_edit=0,
                 w_loc=0.0, w_anchor=2, loc_prompt="About {}:", kl_direction="current_ref", proxy_fidelity=True,
                 edit_prompts="bare", tol=1.0)


def test_valid_window_config_constructs():
    WindowConfig(method="one_for_all", window_size=1, v_num_grad_steps=1, v_lr=2, clamp_norm_factor=0.75,
                 v_weight_decay=0, early_stop_loss=0, coefficients="matryoshka", affinity_pairing="legacy",
                 affinity_steps=1, on_mismatch="error", preservation=True, chat=False, template="qwen2.5",
                 metric_style="reference")
    WindowConfig(method="anyedit", template="llama3", metric_style="torchmetrics")


def test_valid_stats_config_constructs():
    StatsConfig(dataset="wikimedia/wikipedia", config_name="20231101.en", split="train[:1%]", text_field="text",
                n_samples=1, max_length=1, batch_tokens=1, dtype="float64", shuffle_seed=None)
    for dtype in ("float32", "float64", "bfloat16", "float16"):
        StatsConfig(dtype=dtype, shuffle_seed=0)


# -- the helpers ----------------------------------------------------------------------------------------------------

def test_check_helpers():
    assert checks.number("x", 3, gt=0) == 3 and checks.number("x", 0.0, ge=0, le=1) == 0.0
    assert checks.integer("n", 0, ge=0) == 0
    assert checks.choice("c", None, (None, "a")) is None
    for bad in (NAN, INF, -INF, True, "1", None):
        with pytest.raises(ValueError, match=r"^x must be a finite number, got "):
            checks.number("x", bad)
    with pytest.raises(ValueError, match=r"^x must be a finite number < 1, got 1 \(see here\)$"):
        checks.number("x", 1, lt=1, note="see here")
    with pytest.raises(ValueError, match=r"^n must be an integer in \[1, 3\], got 4$"):
        checks.integer("n", 4, ge=1, le=3)
    with pytest.raises(ValueError, match=r"^c must be one of 0, 1, got False$"):
        checks.choice("c", False, (0, 1))  # False == 0, but a bool is not an option here
    with pytest.raises(ValueError, match=r"^b must be true or false, got 'true'$"):
        checks.boolean("b", "true")


# -- through the CLI: a bad YAML value stops the run before any weights load ---------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("edit,expected", [
    ("model: {solver: {init_args: {L2: .inf}}}", "solver AlphaEdit: L2 must be a finite number > 0, got inf"),
    ("model: {method: {init_args: {base: {v_lr: .nan}}}}", "model.method.init_args.v_lr must be a finite number > 0, got nan"),
    ("model: {method: {init_args: {base: {fact_token: subjct_last}}}}", "model.method.init_args.fact_token must be one of"),
    ("model: {method: {init_args: {T: -1}}}", "model.method.init_args.T must be an integer >= 0, got -1"),
    ("model: {stats: {dtype: fp64}}", "model.stats.dtype must be one of"),
], ids=["L2-inf", "v_lr-nan", "fact_token-typo", "T-negative", "stats-dtype"])
def test_cli_refuses_bad_yaml_value(edit, expected, tmp_path, monkeypatch, capsys):
    from tests.test_configs import cli_for

    # configs/world/metake.yaml (MetaKE over AlphaEdit) with one bad value, in a config that names it as its base
    (tmp_path / "bad.yaml").write_text(f"base: {ROOT / 'configs' / 'world' / 'metake.yaml'}\n{edit}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises((ValueError, SystemExit)) as err:
        cli_for(tmp_path / "bad.yaml")
    assert expected in str(err.value) + capsys.readouterr().err


@pytest.mark.parametrize("kw,named", [
    ({"layers": []}, "model.layers must be a non-empty list"),
    ({"layers": [0, 0]}, "model.layers must not repeat"),
    ({"layers": [-1, 1]}, "model.layers[0] must be an integer >= 0, got -1"),
    ({"layers": [1.5]}, "model.layers[0] must be an integer"),
    ({"dtype": "fp32"}, "model.dtype must be one of"),
    ({"context_templates": [[10]]}, "model.context_templates[0] must be [length, count]"),
    ({"context_templates": [[0, 5]]}, "model.context_templates[0][0] (length in tokens) must be an integer >= 1"),
    ({"eval_every_n_steps": -1}, "model.eval_every_n_steps must be an integer >= 0, got -1"),
    ({"sync_check_every_n_steps": True}, "model.sync_check_every_n_steps must be an integer"),
    ({"context_seed": -3}, "model.context_seed must be an integer >= 0"),
    ({"allow_changed": [""]}, "model.allow_changed[0] must be a non-empty string"),
])
def test_edit_module_refuses_bad_settings_at_construction(kw, named):
    from lit_edit.module import EditModule

    with pytest.raises(ValueError) as err:
        EditModule(**kw)
    assert named in str(err.value)
