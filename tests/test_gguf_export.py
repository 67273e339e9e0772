"""The GGUF export (lit_edit/gguf_export.py) of an edited real model, SmolLM2-135M-Instruct from its packaged Q4_1 GGUF:
the file reloads through transformers' GGUF reader and gives the edited float model's logits (F32 to 1e-6, F16 within
F16 rounding); only the edited tensor differs from the unedited export; ``source`` keeps every other tensor's bytes;
bad input is named before anything is written."""
import pytest
import torch

from lit_edit import sources
from lit_edit.gguf_export import GGUFExportError, check_export, check_type, export_gguf, gguf_names
from tests.conftest import REPO_ROOT
from tests.helpers import shared_file

EDITED = "model.layers.5.mlp.down_proj.weight"
PROMPTS = ["Danielle Darrieux's mother tongue is", "Toyota is a company from"]


@pytest.fixture(scope="module")
def edited():
    """SmolLM2 (from the test cache) with a random change of layer 5's down_proj as large as an edit's, and its GGUF."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LIT_EDIT_CACHE", str(REPO_ROOT / "data" / "cache"))
    from lit_edit.models import load_model

    model, tok, _ = load_model("smollm2-135m-instruct")
    model.requires_grad_(False).eval()
    W = model.get_parameter(EDITED)
    g = torch.Generator().manual_seed(0)
    W += 0.05 * W.norm() / W.numel() ** 0.5 * torch.randn(W.shape, generator=g)
    yield model, tok, sources.PACKAGED["smollm2-135m-instruct"].locate()
    mp.undo()


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, tok):
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_f32_and_f16_exports_reload_as_the_edited_model(edited, tmp_path):
    model, tok, source = edited
    want = logits(model, tok)
    weights = {EDITED: model.get_parameter(EDITED)}
    f32 = export_gguf(source, tmp_path / "f32.gguf", weights, "F32")
    assert f32.edited == ["blk.5.ffn_down.weight"] and set(f32.types.values()) == {"F32"}
    torch.testing.assert_close(logits(reload(f32.path), tok), want, rtol=0, atol=1e-6)
    f16 = export_gguf(source, tmp_path / "f16.gguf", weights, "F16")
    got = logits(reload(f16.path), tok)
    # F16 keeps 11 significant bits of every weight: the logits move by a few thousandths, not more
    assert (got - want).abs().max() < 0.05 and not torch.equal(got, want)
    assert f16.types["blk.5.attn_norm.weight"] == "F32" and f16.types["blk.5.ffn_down.weight"] == "F16"


def test_only_the_edited_tensor_differs_and_source_keeps_the_other_bytes(edited, tmp_path):
    import gguf

    model, tok, source = edited
    plain = export_gguf(source, tmp_path / "plain.gguf", {}, "F32")
    edit = export_gguf(source, tmp_path / "edit.gguf", {EDITED: model.get_parameter(EDITED)}, "F32")
    a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (plain.path, edit.path))
    differ = [n for n in a if not (a[n].data == b[n].data).all()]
    assert differ == ["blk.5.ffn_down.weight"]
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    kept = export_gguf(source, tmp_path / "q.gguf", {EDITED: model.get_parameter(EDITED)}, "source")
    q = {t.name: t for t in gguf.GGUFReader(kept.path).tensors}
    assert kept.types["blk.5.ffn_down.weight"] == "Q4_1" and not kept.substituted
    for name, t in src.items():
        same = t.data.tobytes() == q[name].data.tobytes()
        assert same == (name != "blk.5.ffn_down.weight"), name
    meta = gguf.GGUFReader(kept.path).fields
    assert meta["tokenizer.chat_template"].contents() == gguf.GGUFReader(source).fields["tokenizer.chat_template"].contents()
    # the source's bytes with the edited matrix in 8 bits: only that tensor differs, and it is the F32 export's
    # matrix to within Q8_0's rounding: a block of 32 shares one scale d = max|w| / 127, each weight is off by at most
    # d / 2, and d itself is stored as F16 (relative error 2^-11, times |q| <= 127 codes): 0.5 d + 127 d 2^-11
    mixed = export_gguf(source, tmp_path / "mixed.gguf", {EDITED: model.get_parameter(EDITED)}, "source", "Q8_0")
    m8 = {t.name: t for t in gguf.GGUFReader(mixed.path).tensors}
    assert mixed.types["blk.5.ffn_down.weight"] == "Q8_0" and mixed.types["blk.5.ffn_up.weight"] == "Q4_1"
    for name, t in src.items():
        assert (t.data.tobytes() == m8[name].data.tobytes()) == (name != "blk.5.ffn_down.weight"), name
    W = b["blk.5.ffn_down.weight"].data
    got = gguf.quants.dequantize(m8["blk.5.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    step = abs(W.reshape(-1, 32)).max(1, keepdims=True) / 127
    assert (abs(got.reshape(-1, 32) - W.reshape(-1, 32)) <= (0.5 + 127 * 2.0**-11) * step + 1e-7).all()
    # and it is the edited matrix, not the source's: 8 bits sit far closer to it on average than the unedited 4-bit
    # one (the rounding alone is ~16x finer; the edit adds to the 4-bit one's distance)
    old = gguf.quants.dequantize(src["blk.5.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q4_1)
    assert abs(got - W.reshape(got.shape)).mean() < 0.2 * abs(old - W.reshape(got.shape)).mean()


def test_bad_exports_are_named_before_anything_is_written(edited, tmp_path):
    model, _, source = edited
    with pytest.raises(GGUFExportError, match="model.export_gguf_type 'Q4_K_M' is not a GGUF export type"):
        check_type("Q4_K_M")
    with pytest.raises(GGUFExportError, match="model.model 'world' is not read from one"):
        check_export("world", "gguf", "source")
    with pytest.raises(GGUFExportError, match="model.export_gguf_edited_type 'source' is not a type for the edited"):
        check_export("smollm2-135m-instruct", "gguf", "source", "source")
    with pytest.raises(GGUFExportError, match="the edited tensors' type 'Q4_K' is not a type for the edited"):
        export_gguf(source, tmp_path / "x.gguf", {}, "source", "Q4_K")
    with pytest.raises(GGUFExportError, match="model.export_format 'onnx' is not one of safetensors, gguf"):
        check_export("smollm2-135m-instruct", "onnx", "F16")
    check_export("smollm2-135m-instruct", "gguf", "source") and check_export("/m/x.gguf", "gguf", "Q8_0")
    with pytest.raises(GGUFExportError, match="not one"):
        export_gguf(tmp_path / "model.safetensors", tmp_path / "x.gguf", {}, "F16")
    with pytest.raises(GGUFExportError, match="no tensor in the file"):
        gguf_names(source, ["model.layers.99.mlp.down_proj.weight"])
    with pytest.raises(GGUFExportError, match="writing the GGUF export"):
        export_gguf(source, tmp_path / "missing" / "x.gguf", {}, "F32")
    assert not list(tmp_path.rglob("*.gguf*"))


def test_survival_benchmark_scores_each_export_against_the_float_model(edited, tmp_path, capsys):
    """benchmarks/gguf_survival.py end to end on two records, from a run's checkpoint (the edited matrices as
    ``llm.<name>``): the float row is the edited model's own scores, 8 bits keep every efficacy outcome of this
    (edit-sized) change, and ``source+Q8_0`` stores the source's 4-bit file with 8-bit edited matrices: smaller than the
    all-8-bit file, larger than the source."""
    import importlib
    import sys

    from lit_edit.data import read_requests
    from lit_edit.layouts import edited_weights, get_layout
    from lit_edit.metrics import record_scores

    model, tok, _ = edited
    path = shared_file("counterfact_sample.json")  # the config's records
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"llm." + n: w.detach().clone()
                               for n, w in edited_weights(model, get_layout(model), [3, 4, 5, 6, 7]).items()}}, ckpt)
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        rows = importlib.import_module("gguf_survival").main(
            ["--checkpoint", str(ckpt), "--config", "configs/smollm2-135m/memit_counterfact.yaml", "--limit", "2",
             "--types", "Q8_0", "source+Q8_0"])
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    names = [k for k in rows if not k.startswith("unedited")]
    (fl, n, _), (q8, kept8, _), (mixed, kept_mixed, _) = (rows[k] for k in names)
    requests = read_requests("counterfact", str(path), limit=102)
    want = record_scores(model, tok, requests[100:])
    assert n == 2 and fl["efficacy_magnitude"] == pytest.approx(
        100 * sum(r["efficacy_magnitude"] for r in want) / 2, abs=1e-6)
    assert kept8 == 2 and abs(q8["efficacy_magnitude"] - fl["efficacy_magnitude"]) < 1.0
    assert names[1].startswith("Q8_0 (edited tensors Q8_0;") and names[2].startswith("source+Q8_0 (edited tensors Q8_0;")
    # its other tensors are the very bytes the float model was dequantised from: only 8-bit rounding separates them
    assert kept_mixed == 2 and abs(mixed["specificity"] - fl["specificity"]) <= 10.0  # at most 2 of 20 prompts
    mib = [float(k.split("; ")[-1].split(" MiB")[0]) for k in names[1:]]
    src_mib = float(next(k for k in rows if k.startswith("unedited")).split("(")[1].split(" MiB")[0])
    assert src_mib < mib[1] < mib[0], (src_mib, mib)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT ")
