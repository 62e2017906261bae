"""Released MGCA / GLoRIA checkpoints -> workdirs: parity with the authors' forward pass, key layouts, refusals.

Each parity test builds a tiny PyTorch model that follows the authors' forward pass with the authors' module
names (tests/released/released_torch.py), gives it random weights and running statistics, saves it as a
Lightning-style ``.ckpt`` in the released key layout, imports it (launch/import_checkpoint.py or the library),
restores the workdir with ``evaluators.common.load_run`` as launch/evaluate.py does, and compares the global and
local embeddings of our Flax model with the PyTorch ones (1e-4 relative).
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medvlp_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from medvlp_jax import released  # noqa: E402
from medvlp_jax.models.dual_encoder import DualEncoder  # noqa: E402
from tests.released import released_torch as rt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released_manifests")
sys.path.insert(0, os.path.join(ROOT, "launch"))

VOCAB = rt.toy_vocab(["heart", "size", "is", "normal", "no", "pleural", "effusion", "bilateral", "pneumo", "lung",
                      "clear", "mild", "opacity", "seen", "the", "and", "left", "right", "base", "or"],
                     ["s", "thorax", "ly", "ity"])
TEXTS = ["heart size is normal", "bilaterally effusions and pneumothorax",
         "no pleural effusion or pneumothorax seen the lungs clear and mild left base opacity right base opacity"]
TEXT_LEN = 16           # the third text is truncated: its [SEP] lands in the last slot
VOCAB_SIZE = 40         # > len(VOCAB): the embedding table may be larger than the tokenizer
BERT = rt.BertSizes(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=48, max_position_embeddings=24)
RESNET = dict(stage_sizes=(2, 1, 2, 1), width=8)   # j > 0 blocks without downsample in stages 1 and 3
IDX2WORD = dict(enumerate(VOCAB))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer directory with the toy vocabulary and a tiny prepared data set (what load_run validates)."""
    from medvlp_jax.data.sources import synthetic
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    data = str(tmp_path_factory.mktemp("data"))
    synthetic.prepare_synthetic(data, num_train=8, num_test=8, num_shards=1)
    return dict(tok_dir=tok_dir, data=data, tmp=tmp_path_factory)


def _inputs(tok_dir, image_size, seed=0):
    """The same batch for both sides: images NCHW (torch) / NHWC (ours), tokens, our word-piece slots."""
    enc = tokenizer_lib.encode(tokenizer_lib.load_tokenizer(tok_dir), TEXTS, TEXT_LEN)
    tokens = [[VOCAB[i] for i in row] for row in enc["input_ids"]]
    assert any(t.startswith("##") for row in tokens for t in row), "the texts must exercise word-piece merging"
    assert enc["attention_mask"][2].all() and not enc["attention_mask"][0].all(), "one full, one padded text"
    imgs = np.random.default_rng(seed).uniform(-1, 1, (3, 3, image_size, image_size)).astype(np.float32)
    batch = dict(image=imgs.transpose(0, 2, 3, 1), **enc)
    return torch.tensor(imgs), torch.tensor(enc["input_ids"].astype(np.int64)), \
        torch.tensor(enc["attention_mask"].astype(np.int64)), batch


def _ours(workdir, batch):
    """Restores the workdir as launch/evaluate.py does and runs both towers in eval mode."""
    from medvlp_jax.evaluators import common
    run = common.load_run(workdir, devices=jax.devices()[:1])
    out = jax.jit(lambda v, b: run.model.apply(v, b, train=False))(run.variables, batch)
    return run, {k: np.asarray(getattr(out, k)) for k in ("img_emb", "patch_emb", "txt_emb", "word_emb")}


def _assert_close(got, want, name, tol=1e-4):
    want = want.numpy() if hasattr(want, "numpy") else want
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < tol, f"{name}: relative error {err:.2e}"


def _normalized_manifest(name):
    keys, ranks = set(), {}
    with open(os.path.join(MANIFESTS, name)) as f:
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            n = rt.normalize_key(key)
            keys.add(n)
            ranks[n] = len(re.findall(r"\d+", shape))
    return keys, ranks


def _assert_layout(state_dict, manifest):
    """The tiny model's keys are the manifest's keys modulo layer/block indices, with the same tensor ranks."""
    want, ranks = _normalized_manifest(manifest)
    got = {rt.normalize_key(k): v.dim() for k, v in state_dict.items()}
    assert set(got) == want, (sorted(set(got) - want)[:10], sorted(want - set(got))[:10])
    assert {k: got[k] for k in want} == ranks


def _mgca_model(image, seed):
    if image == "vit":
        net, dims = rt.VisionTransformer(image_size=32, patch=8, width=32, depth=2, heads=2, mlp=64), (32, 32)
    else:
        net = rt.ResNet(**RESNET)
        dims = (RESNET["width"] * 32, RESNET["width"] * 16)      # layer4 / layer3 channels
    model = rt.MGCA(net, dims, BERT, IDX2WORD, hidden=24, dim=16, num_prototypes=12)
    return rt.randomize(model, seed)


def _save(obj, path):
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# MGCA.

@pytest.mark.parity
def test_mgca_vit_through_the_cli(env, capsys):
    """MGCA ViT: launch/import_checkpoint.py -> workdir -> load_run -> embeddings equal the authors' forward."""
    import import_checkpoint
    model = _mgca_model("vit", seed=1)
    sd = model.state_dict()
    _assert_layout(sd, "mgca_vit_b16.keys.tsv")
    path = _save(rt.lightning_checkpoint(sd, "mgca", hparams=dict(img_encoder="vit_base", emb_dim=16)),
                 str(env["tmp"].mktemp("ck") / "mgca_vit.ckpt"))
    out = str(env["tmp"].mktemp("wd") / "mgca_vit")
    import_checkpoint.main(["--format=mgca", f"--source={path}", f"--out={out}", f"--tokenizer_dir={env['tok_dir']}",
                            f"--data_root={env['data']}", "--image_heads=2", "--text_heads=2",
                            f"--max_text_len={TEXT_LEN}"])
    printed = capsys.readouterr().out
    assert "missing 0, unexpected 0" in printed and "wrote" in printed

    imgs, ids, mask, batch = _inputs(env["tok_dir"], 32)
    want = model.embed(imgs, ids, mask)
    run, got = _ours(out, batch)
    for k in ("img_emb", "patch_emb", "txt_emb"):
        _assert_close(got[k], want[k], k)
    _assert_close(got["word_emb"][:, 1:], want["word_emb"], "word_emb")   # MGCA drops the [CLS] slot
    np.testing.assert_array_equal(np.asarray(run.method_params["prototypes"]),
                                  model.prototype_layer.weight.detach().numpy())

    with open(os.path.join(out, "import_report.json")) as f:
        report = json.load(f)
    cross = [k for k in sd if ".crossattention." in k]
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    unused = [k for k in sd if "local_atten_layer" in k]
    assert report["ok"] and not report["missing"] and not report["unexpected"]
    buffers = ["text_encoder_q.model.embeddings.position_ids"]
    assert sorted(report["ignored"]) == sorted(cross + counters + unused + buffers)
    assert len(report["loaded"]) == len(sd) - len(report["ignored"])
    assert report["shapes_checked"] == len(report["loaded"]) + _split_qkv_extra(sd)
    assert report["lightning"]["global_step"] == 3456 and report["lightning"]["stand_ins"] == []
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model"]["text"]["use_position_ids"] is False and cfg["model"]["text"]["type_vocab_size"] == 0
    assert cfg["model"]["text"]["full_length_tail"] == "drop"
    assert cfg["model"]["image"]["image_size"] == 32 and cfg["method"]["num_prototypes"] == 12


def _split_qkv_extra(sd):
    """Each fused timm qkv tensor becomes three Flax arrays (query/key/value)."""
    return 2 * sum(1 for k in sd if k.endswith(("attn.qkv.weight", "attn.qkv.bias")))


@pytest.mark.parity
def test_mgca_resnet_parity(env):
    """MGCA ResNet-50 layout: 299 upsampling, layer3 -> local head, pooled layer4 -> global head, BN stats."""
    model = _mgca_model("resnet", seed=2)
    sd = model.state_dict()
    _assert_layout(sd, "mgca_resnet50.keys.tsv")
    path = _save(rt.lightning_checkpoint(sd, "mgca"), str(env["tmp"].mktemp("ck") / "mgca_rn.ckpt"))
    options = released.ImportOptions(tokenizer_dir=env["tok_dir"], data_root=env["data"], text_heads=2,
                                     max_text_len=TEXT_LEN)
    result = released.import_checkpoint("mgca", path, options)
    assert result.report.ok, result.report.summary()
    assert result.config.model.image.resize_to == 299 and tuple(result.config.model.image.stage_sizes) == (2, 1, 2, 1)
    out = released.write_workdir(str(env["tmp"].mktemp("wd") / "mgca_rn"), result.config, result.variables,
                                 result.method_params, result.report)
    imgs, ids, mask, batch = _inputs(env["tok_dir"], 32, seed=1)     # upsampled to 299 on both sides
    want = model.embed(imgs, ids, mask)
    _, got = _ours(out, batch)
    assert got["patch_emb"].shape == (3, 19 * 19, 16)
    for k in ("img_emb", "patch_emb", "txt_emb"):
        _assert_close(got[k], want[k], k)
    _assert_close(got["word_emb"][:, 1:], want["word_emb"], "word_emb")


# ----------------------------------------------------------------------------------------------------------
# GLoRIA.

def _gloria_model(seed):
    from transformers import BertConfig
    cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=24, attn_implementation="eager")
    net = rt.ResNet(**RESNET)
    model = rt.GloriaPretrainModel(net, (RESNET["width"] * 32, RESNET["width"] * 16), cfg, IDX2WORD)
    return rt.randomize(model, seed)


def _save_gloria(sd, path):
    with rt.fake_lightning_modules() as classes:
        torch.save(rt.lightning_checkpoint(sd, "gloria", classes=classes), path)
    return path


@pytest.mark.parity
def test_gloria_parity(env):
    """GLoRIA: sum of the last 4 layers, merged words, mean over all slots, 1x1 conv local head, no norm."""
    model = _gloria_model(seed=3)
    sd = model.state_dict_released()
    _assert_layout(sd, "gloria_resnet50.keys.tsv")
    path = _save_gloria(sd, str(env["tmp"].mktemp("ck") / "gloria.ckpt"))
    with pytest.raises(Exception):                      # PL 1.1.4 / omegaconf globals: refused by plain weights_only
        torch.load(path, map_location="cpu", weights_only=True)
    options = released.ImportOptions(tokenizer_dir=env["tok_dir"], data_root=env["data"], text_heads=2,
                                     max_text_len=TEXT_LEN)
    result = released.import_checkpoint("gloria", path, options)
    report = result.report
    assert report.ok, report.summary()
    assert "omegaconf.dictconfig.DictConfig" in report.lightning["stand_ins"]
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in report.lightning["stand_ins"]
    assert sorted(k for k, why in report.ignored.items() if "pooler" in why) == [
        "gloria.text_encoder.model.pooler.dense.bias", "gloria.text_encoder.model.pooler.dense.weight"]
    assert result.config.model.text.sum_last_layers == 4 and result.config.model.proj.normalize is False
    out = released.write_workdir(str(env["tmp"].mktemp("wd") / "gloria"), result.config, result.variables,
                                 result.method_params, result.report)
    imgs, ids, mask, batch = _inputs(env["tok_dir"], 32, seed=2)
    want = model.embed(imgs, ids, mask)
    run, got = _ours(out, batch)
    for k in ("img_emb", "patch_emb", "txt_emb", "word_emb"):
        _assert_close(got[k], want[k], k)
    # The objective's report vector (what zero-shot scoring uses for GLoRIA) is the same sentence vector.
    from medvlp_jax.methods import gloria as gloria_method
    txt = run.model.apply(run.variables, batch, method=DualEncoder.encode_text)
    g = gloria_method.report_vector(txt.word_emb, txt.slot_mask, txt.txt_emb, run.config.method.report_vector)
    _assert_close(np.asarray(g), want["txt_emb"], "report_vector")


# ----------------------------------------------------------------------------------------------------------
# Full size: the manifests' exact keys and shapes convert into the model the imported config builds.

def _manifest_checkpoint(name):
    sd = {}
    with open(os.path.join(MANIFESTS, name)) as f:
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            dims = [int(d) for d in re.findall(r"\d+", shape)]
            sd[key] = np.zeros(dims, np.int64 if dtype == "int64" else np.float32)
    return released.LoadedCheckpoint(path=name, state_dict=sd, meta={}, stand_ins=[])


@pytest.mark.parametrize("manifest,fmt", [("mgca_vit_b16.keys.tsv", "mgca"), ("mgca_resnet50.keys.tsv", "mgca"),
                                          ("gloria_resnet50.keys.tsv", "gloria")])
def test_full_size_manifest_converts(manifest, fmt, env):
    """Every key of the released layouts at full size: loaded or ignored for its documented reason, and every
    converted array has the shape of the model (ViT-B/16 or ResNet-50 + BERT) built from the imported config."""
    from medvlp_jax.released import workdir
    ckpt = _manifest_checkpoint(manifest)
    config, variables, method_params, report = released.FORMATS[fmt](
        ckpt, released.ImportOptions(tokenizer_dir=env["tok_dir"], data_root=env["data"]))
    workdir.check_shapes(config, variables, method_params, report)
    assert report.ok, report.summary()
    keys = list(ckpt.state_dict)
    expected_ignored = [k for k in keys if k.endswith(("num_batches_tracked", "position_ids"))
                        or ".crossattention." in k or "local_atten_layer" in k or ".pooler." in k]
    assert sorted(report.ignored) == sorted(expected_ignored)
    assert sorted(report.loaded) == sorted(set(keys) - set(expected_ignored))
    assert report.shapes_checked == len(report.loaded) + _split_qkv_extra(ckpt.state_dict)
    image = config.model.image
    if fmt == "mgca" and "vit" in manifest:
        assert (image.width, image.depth, image.num_heads, image.image_size, image.patch_size) == (768, 12, 12, 224, 16)
        assert method_params["prototypes"].shape == (500, 128)
    else:
        assert tuple(image.stage_sizes) == (3, 4, 6, 3) and image.width == 64 and image.resize_to == 299
    text = config.model.text
    assert (text.vocab_size, text.width, text.num_heads, text.max_position) == (28996, 768, 12, 512)
    want = (6, 0, 112) if fmt == "mgca" else (12, 2, 97)
    assert (text.depth, text.type_vocab_size, config.data.max_text_len) == want


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line each.

@pytest.fixture(scope="module")
def mgca_ckpt(env):
    model = _mgca_model("vit", seed=4)
    sd = model.state_dict()
    path = _save(rt.lightning_checkpoint(sd, "mgca"), str(env["tmp"].mktemp("ck") / "mgca.ckpt"))
    return path, sd


def _cli(argv, capsys):
    import import_checkpoint
    with pytest.raises(SystemExit) as e:
        import_checkpoint.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    return err


def test_refuses_without_torch(mgca_ckpt, env, monkeypatch, capsys):
    path, _ = mgca_ckpt
    monkeypatch.setitem(sys.modules, "torch", None)          # "import torch" now raises ImportError
    with pytest.raises(released.TorchRequired, match="needs torch"):
        released.read_checkpoint(path)
    out = str(env["tmp"].mktemp("wd") / "x")
    err = _cli(["--format=mgca", f"--source={path}", f"--out={out}"], capsys)
    assert "torch" in err and path in err and not os.path.exists(out)


def test_refuses_the_wrong_format(mgca_ckpt, env, capsys):
    path, _ = mgca_ckpt
    err = _cli(["--format=gloria", f"--source={path}", f"--out={env['tmp'].mktemp('wd')}/x",
                f"--tokenizer_dir={env['tok_dir']}"], capsys)
    assert "not a GLoRIA checkpoint" in err and "gloria.img_encoder.global_embedder.weight" in err
    err = _cli(["--format=mgca", "--image_encoder=resnet50", f"--source={path}",
                f"--out={env['tmp'].mktemp('wd')}/x", f"--tokenizer_dir={env['tok_dir']}"], capsys)
    assert "holds a vit image encoder" in err


def test_refuses_missing_and_unexpected_keys(mgca_ckpt, env, capsys):
    _, sd = mgca_ckpt
    sd = dict(sd)
    gone = ["text_encoder_q.model.encoder.layer.1.output.dense.bias", "img_encoder_q.local_embed.head.4.running_var"]
    for k in gone:
        del sd[k]
    sd["img_encoder_q.extra_head.weight"] = torch.zeros(3, 3)
    path = _save(rt.lightning_checkpoint(sd, "mgca"), str(env["tmp"].mktemp("ck") / "broken.ckpt"))
    options = released.ImportOptions(tokenizer_dir=env["tok_dir"], data_root=env["data"], image_heads=2,
                                     text_heads=2, max_text_len=TEXT_LEN)
    result = released.import_checkpoint("mgca", path, options)
    assert not result.report.ok
    assert sorted(result.report.missing) == sorted(gone)
    assert result.report.unexpected == ["img_encoder_q.extra_head.weight"]
    out = str(env["tmp"].mktemp("wd") / "x")
    with pytest.raises(released.CheckpointImportError):
        released.write_workdir(out, result.config, result.variables, result.method_params, result.report)
    err = _cli(["--format=mgca", f"--source={path}", f"--out={out}", f"--tokenizer_dir={env['tok_dir']}",
                f"--data_root={env['data']}", "--image_heads=2", "--text_heads=2", f"--max_text_len={TEXT_LEN}"],
               capsys)
    assert all(k in err for k in gone) and "img_encoder_q.extra_head.weight" in err and not os.path.exists(out)


def test_refuses_a_tokenizer_larger_than_the_vocabulary(mgca_ckpt, env, tmp_path, capsys):
    path, _ = mgca_ckpt
    with open(tmp_path / "vocab.txt", "w") as f:
        f.write("\n".join(VOCAB + [f"w{i}" for i in range(VOCAB_SIZE)]) + "\n")
    err = _cli(["--format=mgca", f"--source={path}", f"--out={tmp_path}/wd", f"--tokenizer_dir={tmp_path}",
                "--image_heads=2", "--text_heads=2", f"--max_text_len={TEXT_LEN}"], capsys)
    assert "word embedding table has 40 rows" in err
    err = _cli(["--format=mgca", f"--source={path}", f"--out={tmp_path}/wd", f"--tokenizer_dir={env['tok_dir']}",
                "--image_heads=2", "--text_heads=2"], capsys)
    assert "max_text_len 112 exceeds the checkpoint's 24 positions" in err


def test_restricted_reader_runs_nothing_from_the_file(env, tmp_path):
    """A pickle that asks for os.system is refused (torch blocks the module); the command never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": Evil()}, path)
    with pytest.raises(released.CheckpointImportError, match="posix.system|os.system"):
        released.read_checkpoint(path)
    assert not marker.exists()


def test_stand_ins_discard_unknown_objects(tmp_path):
    """GLoRIA-style globals become inert stand-ins: tensors come back, callback/config objects are placeholders."""
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.num_batches_tracked": torch.tensor(7)}
    path = str(tmp_path / "g.ckpt")
    with rt.fake_lightning_modules() as classes:
        torch.save(rt.lightning_checkpoint(sd, "gloria", classes=classes), path)
    ckpt = released.read_checkpoint(path)
    np.testing.assert_array_equal(ckpt.state_dict["a.weight"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert ckpt.state_dict["a.num_batches_tracked"] == 7
    assert ckpt.meta["hyper_parameters"] == "<stand-in for omegaconf.dictconfig.DictConfig>"
    assert ckpt.meta["global_step"] == 3456 and ckpt.meta["pytorch_lightning_version"] == "1.1.4"


# ----------------------------------------------------------------------------------------------------------
# The two model options the imports need.

def test_bert_without_token_type_table():
    """type_vocab_size=0 builds no token-type table and equals a BERT whose type-0 row is zero."""
    from medvlp_jax.models.bert import Bert
    kw = dict(vocab_size=30, width=16, depth=1, num_heads=2, mlp_dim=32, max_position=12, dropout=0.0,
              attention_dropout=0.0)
    ids = np.arange(2 * 7, dtype=np.int32).reshape(2, 7) % 30
    mask = np.ones((2, 7), np.int32)
    none = Bert(type_vocab_size=0, **kw)
    p0 = none.init(jax.random.PRNGKey(0), ids, mask)["params"]
    assert "token_type_embeddings" not in p0
    two = Bert(type_vocab_size=2, **kw)
    p2 = dict(p0, token_type_embeddings={"embedding": np.zeros((2, 16), np.float32)})
    np.testing.assert_allclose(np.asarray(none.apply({"params": p0}, ids, mask)["tokens"]),
                               np.asarray(two.apply({"params": p2}, ids, mask)["tokens"]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_imported_workdir_through_launch_evaluate(mgca_ckpt, env):
    """launch/evaluate.py (a separate process) evaluates an imported workdir like one of ours."""
    path, _ = mgca_ckpt
    options = released.ImportOptions(tokenizer_dir=env["tok_dir"], data_root=env["data"], image_heads=2,
                                     text_heads=2, max_text_len=TEXT_LEN)
    result = released.import_checkpoint("mgca", path, options)
    out = released.write_workdir(str(env["tmp"].mktemp("wd") / "eval"), result.config, result.variables,
                                 result.method_params, result.report)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
                           "--config=configs/eval/quick.py", f"--checkpoint={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "eval", "quick.json")) as f:
        res = json.load(f)
    assert res["protocol/checkpoint_step"] == 0 and 0.0 <= res["zero_shot/macro_auroc"] <= 1.0
    assert res["retrieval/num_pairs"] == 8
