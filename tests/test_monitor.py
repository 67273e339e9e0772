"""The drift and probe monitor (lit_edit.monitor, lit_edit.probes): each value against a direct computation on a tiny
model, clear errors for bad sources, and a fit on the tiny world that logs drift/* and probe/* at every step."""
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from lit_edit.data import EditDataError, EditDataModule
from lit_edit.data.files import iter_texts
from lit_edit.editing import add_to_weight
from lit_edit.layouts import get_layout, get_weight
from lit_edit.monitor import DriftText, Monitor, drift, swapped_weights, update_norms
from lit_edit.probes import ProbeContext, make_probes
from lit_edit.tokens import bos_ids, encode, target_ids
from tests.helpers import SENTENCES, tiny_gpt2, tiny_tokenizer

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    model = tiny_gpt2(tok)
    return model, tok, get_layout(model)


def seqs_of(tok, texts):
    return [bos_ids(tok) + encode(tok, t) for t in texts]


def direct_logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_perplexity_equals_a_direct_computation(tiny):
    model, tok, layout = tiny
    seqs = seqs_of(tok, SENTENCES)
    nll, n = 0.0, 0
    for ids in seqs:  # one sequence at a time, no padding
        lp = direct_logp(model, ids)
        nll -= sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        n += len(ids) - 1
    got = drift(model, tok, layout, seqs, None, batch_size=2)  # padded batches of two
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)
    assert got["kl"] == 0.0 and got["agreement"] == 1.0


def test_kl_and_agreement_against_the_unedited_weights(tiny):
    model, tok, layout = tiny
    seqs = seqs_of(tok, SENTENCES)
    W0 = {l: get_weight(model, layout, l).clone() for l in LAYERS}
    same = drift(model, tok, layout, seqs, W0, batch_size=3)  # the reference pass swaps W0 in: identical weights
    assert same["kl"] == 0.0 and same["agreement"] == 1.0
    ref = [direct_logp(model, ids) for ids in seqs]
    delta = 0.5 * torch.randn(get_weight(model, layout, 2).shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
    add_to_weight(model, layout, 2, delta)
    try:
        edited = get_weight(model, layout, 2).clone()
        got = drift(model, tok, layout, seqs, W0, batch_size=3)
        kl, agree, n = 0.0, 0.0, 0
        for ids, p0 in zip(seqs, ref):  # KL(p_unedited ‖ p_edited) at every position that predicts a next token
            p1 = direct_logp(model, ids)
            for t in range(len(ids) - 1):
                kl += float((p0[t].exp() * (p0[t] - p1[t])).sum())
                agree += float(p0[t].argmax() == p1[t].argmax())
                n += 1
        assert got["kl"] > 1e-3
        assert got["kl"] == pytest.approx(kl / n, rel=1e-6)
        assert got["agreement"] == pytest.approx(agree / n) and got["agreement"] < 1.0
        assert torch.equal(get_weight(model, layout, 2), edited)  # the edited weights are back, bit for bit
    finally:
        add_to_weight(model, layout, 2, -delta)


def test_update_norm_is_the_frobenius_norm_of_the_change(tiny):
    model, tok, layout = tiny
    W0 = {l: get_weight(model, layout, l).clone() for l in LAYERS}
    assert all(v == 0.0 for v in update_norms(model, layout, W0).values())
    delta = torch.zeros_like(W0[1])
    delta[0, :3] = torch.tensor([3.0, 4.0, 12.0])  # ‖Δ‖_F = 13
    add_to_weight(model, layout, 1, delta)
    try:
        got = update_norms(model, layout, W0)
        assert got["update_norm/layer_1"] == pytest.approx(13.0, rel=1e-6)
        assert got["update_rel/layer_1"] == pytest.approx(13.0 / float(W0[1].norm()), rel=1e-6)
        assert got["update_norm/layer_2"] == 0.0
    finally:
        add_to_weight(model, layout, 1, -delta)


def test_swapped_weights_are_restored_after_an_error(tiny):
    model, _, layout = tiny
    before = get_weight(model, layout, 1).clone()
    with pytest.raises(RuntimeError):
        with swapped_weights(model, layout, {1: torch.zeros_like(before)}):
            assert float(get_weight(model, layout, 1).abs().sum()) == 0.0
            raise RuntimeError("boom")
    assert torch.equal(get_weight(model, layout, 1), before)


def test_a_probe_from_a_local_jsonl_file_equals_a_direct_log_likelihood(tiny, tmp_path):
    model, tok, _ = tiny
    choices = ["city", "violin", "baker"]  # " city" is one token (read after the prompt), the others several
    assert [len(target_ids(tok, c)) > 1 for c in choices] == [False, True, True]
    rows = [{"sentence": s, "label": i % 3} for i, s in enumerate(SENTENCES)]
    rows[1]["label"] = "violin"  # a label may also name the choice
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = make_probes([{"name": "choice", "key": "mine", "path": str(path), "template": "Review: {sentence} is",
                           "choices": choices, "split": "train", "n_samples": 4, "batch_size": 3}])
    got = probes["mine"].evaluate(model, tok, ProbeContext("tiny"))
    right, nll = 0, 0.0
    for r in rows[:4]:  # the first n_samples rows
        answer = choices.index(r["label"]) if isinstance(r["label"], str) else r["label"]
        scores = []
        for c in choices:  # the whole sequence BOS + prompt + choice, one at a time
            prompt, ids = bos_ids(tok) + encode(tok, f"Review: {r['sentence']} is"), target_ids(tok, c)
            lp = direct_logp(model, prompt + ids)
            scores.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
        right += max(range(3), key=scores.__getitem__) == answer
        nll += -scores[answer] / len(target_ids(tok, choices[answer]))
    assert got == pytest.approx({"acc": right / 4, "nll": nll / 4}, rel=1e-9)


def test_bad_sources_and_settings_fail_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Monitor text.dataset.*missing\.jsonl"):
        list(iter_texts(str(tmp_path / "missing.jsonl"), "text", 5, settings="lit_edit.monitor.Monitor text"))
    path = tmp_path / "corpus.csv"
    path.write_text("body,id\nsome text here,1\nmore text,2\n")
    assert list(iter_texts(str(path), "body", 5, settings="x")) == ["some text here", "more text"]
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", "", "c d", "e"]}).to_parquet(tmp_path / "corpus.parquet")
    assert list(iter_texts(str(tmp_path / "corpus.parquet"), "text", 2, settings="x")) == ["a b", "c d"]
    with pytest.raises(EditDataError, match=r"Monitor text.text_field: .*corpus\.csv has no field 'text' \(its fields: "
                                            r"body, id\)"):
        list(iter_texts(str(path), "text", 5, settings="lit_edit.monitor.Monitor text"))
    task = make_probes([{"name": "choice", "path": str(path), "template": "{body}", "choices": ["a", "b"],
                         "split": "train"}])["choice"]
    with pytest.raises(EditDataError, match=r"probe 'choice' label_field.*corpus\.csv has no field 'label'"):
        task.items(ProbeContext("tiny"))
    with pytest.raises(ValueError, match=r"unknown probe 'glue'; registered: .*sst2"):
        make_probes(["glue"])
    with pytest.raises(ValueError, match=r"probes\[1\]: key 'sst2' must be a new name"):
        make_probes(["sst2", "sst2"])
    with pytest.raises(ValueError, match=r"Monitor text.n_samples must be an integer >= 1"):
        DriftText(n_samples=0)
    with pytest.raises(ValueError, match=r"reads the built-in fact world, but model.model is 'gpt2'"):
        make_probes(["world_background"])["world_background"].items(ProbeContext("gpt2"))


class Capture(Logger):
    """Keeps every (step, metrics) the trainer and the callbacks log."""

    def __init__(self, save_dir):
        super().__init__()
        self._dir, self.points = str(save_dir), []

    name = property(lambda self: "capture")
    version = property(lambda self: 0)
    save_dir = property(lambda self: self._dir)

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.points.append((step, dict(metrics)))


def test_a_fit_logs_drift_and_probes_at_every_applied_batch(tiny_world, tmp_path):
    from lit_edit.methods import VStar
    from lit_edit.module import EditModule
    from lit_edit.solvers import MEMIT
    from lit_edit.stats import StatsConfig

    module = EditModule(model="world:tiny", layers=[0, 1], solver=MEMIT(mom2_update_weight=1000.0),
                        method=VStar(v_num_grad_steps=10, clamp_norm_factor=4.0, fact_token="subject_first"),
                        stats=StatsConfig(dataset="world:tiny", max_length=64), context_templates=[], eval_pre=False)
    monitor = Monitor(every_n_steps=1, text={"n_samples": 16}, probes=[{"name": "world_background", "n_samples": 24},
                                                                       {"name": "world_paraphrase", "n_samples": 24}])
    logger = Capture(tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=logger, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, EditDataModule(path="world:tiny", limit=8, batch_size=4))

    drift_steps = [s for s, m in logger.points if "drift/perplexity" in m]
    assert drift_steps == [0, 1, 2]  # before any edit, after each of the two batches (the last one is the final)
    assert [s for s, m in logger.points if "probe/world_paraphrase/acc" in m] == [0, 1, 2]
    pre, final = monitor.pre, monitor.final
    after_one = dict(monitor.history)[1]  # measured when batch 2 starts: batch 1 is written, whatever the order
    assert after_one["drift/update_norm/layer_1"] > 0 and after_one["drift/kl"] > 0
    assert pre["drift/kl"] == 0.0 and pre["drift/agreement"] == 1.0 and pre["drift/update_norm/layer_1"] == 0.0
    assert pre["probe/world_background/acc"] > 0.8  # the world model knows its untouched facts
    assert final["drift/kl"] > 0.0 and final["drift/agreement"] <= 1.0
    for l in (0, 1):  # the accumulated update is the change of the model's weights since the start
        change = float((get_weight(module.llm, module.layout, l) - monitor.W0[l]).norm())
        assert change > 0 and final[f"drift/update_norm/layer_{l}"] == pytest.approx(change, rel=1e-5)
    # untouched subjects: no subject of the 8 edits is asked by a world probe
    edited = {r.subject for r in module.requests}
    assert edited and not any(s in it.prompt for p in monitor.probes.values() for it in p._items for s in edited)
    metrics = monitor.metrics()
    assert {"pre.drift.perplexity", "drift.perplexity", "drift.kl", "pre.probe.world_background.acc",
            "drift.update_rel.layer_1"} <= set(metrics)
    assert not any(k.startswith(("time", "pre.time")) for k in metrics)
    # a resume re-reads W0 from model.model and measures pre with it swapped in: the same values as before the edits
    w0 = dict(monitor.W0)
    monitor._reload_unedited(module)
    assert all(torch.equal(monitor.W0[l], w0[l]) for l in (0, 1))
    with swapped_weights(module.llm, module.layout, monitor.W0):
        again = monitor.measure(module, unedited=True)
    assert {k: v for k, v in again.items() if not k.startswith("time")} == pytest.approx(
        {k: v for k, v in pre.items() if not k.startswith("time")}, rel=1e-9)
    assert Monitor().load_state_dict(monitor.state_dict()) is None
