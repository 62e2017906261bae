"""benchmarks/compare_torch.py and its PyTorch stand-in: the loss port equals our JAX MGCA loss, the stand-in has
our model's parameter count, and the script runs at the test shapes (no timing asserted)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_mgca  # noqa: E402
from medvlp_jax.data.example_batch import example_batch_for  # noqa: E402
from medvlp_jax.methods import local_ops, mgca  # noqa: E402
from medvlp_jax.types import EncoderOutputs  # noqa: E402
from tests import helpers  # noqa: E402


def _random_outputs(b=4, t=7, p=6, d=8, k=5, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.standard_normal(s)).astype(
        np.float32)
    slot_mask = np.zeros((b, t), bool)
    for i, n in enumerate(rng.integers(3, t + 1, b)):
        slot_mask[i, :n] = True
    word_attn = np.where(slot_mask, rng.uniform(0.01, 1.0, (b, t)), 0.0).astype(np.float32)
    patch_attn = rng.uniform(0.01, 1.0, (b, p)).astype(np.float32)
    arrays = dict(img_emb=unit(b, d), txt_emb=unit(b, d), patch_emb=unit(b, p, d), word_emb=unit(b, t, d),
                  word_attn=word_attn, patch_attn=patch_attn, slot_mask=slot_mask)
    return arrays, unit(k, d)


def test_loss_port_equals_our_jax_loss():
    config = helpers.load_config("mgca")
    arrays, protos = _random_outputs()
    b, t = arrays["slot_mask"].shape
    out = EncoderOutputs(img_emb=arrays["img_emb"], txt_emb=arrays["txt_emb"], patch_emb=arrays["patch_emb"],
                         word_emb=arrays["word_emb"], word_mask=arrays["slot_mask"], slot_mask=arrays["slot_mask"],
                         word_attn=arrays["word_attn"], patch_attn=arrays["patch_attn"],
                         img_feat=arrays["img_emb"], txt_feat=arrays["txt_emb"], patch_feat=arrays["patch_emb"],
                         word_feat=arrays["word_emb"], grid=(2, 3))
    settings = local_ops.read_config(mgca.MgcaConfig, config.method)
    want, terms = mgca.mgca_loss({"prototypes": jnp.asarray(protos)}, out, jnp.ones((b,), bool), settings)
    got, got_terms = torch_mgca.mgca_loss(torch.from_numpy(protos),
                                          {k: torch.from_numpy(v) for k, v in arrays.items()}, config.method)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for ours, theirs in (("loss/ita", "ita"), ("loss/cta", "cta"), ("loss/cpa", "cpa")):
        np.testing.assert_allclose(float(got_terms[theirs]), float(terms[ours]), rtol=1e-5, err_msg=ours)


def test_stand_in_has_our_parameter_count():
    from medvlp_jax import benchmark_lib
    config = helpers.load_config("mgca")
    state = benchmark_lib._build(config, jax.devices()[:1], materialize=False)["state"]   # shapes only
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    theirs = sum(p.numel() for p in torch_mgca.TorchMgca(config).parameters())
    assert ours == theirs


def test_unported_settings_are_refused():
    config = helpers.load_config("mgca")
    config.method.local_negatives = "batch"
    with pytest.raises(ValueError, match="local_negatives"):
        torch_mgca.TorchMgca(config)


def test_bfloat16_runs_the_forward_under_autocast_with_float32_parameters():
    config = helpers.load_config("mgca", "test")
    batch = torch_mgca.to_torch(example_batch_for(config, config.train.batch_size, seed=0))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        torch.manual_seed(0)
        model = torch_mgca.TorchMgca(config)
        assert model.autocast_dtype == (torch.bfloat16 if dtype == "bfloat16" else None)
        seen = []
        dense = model.vit.encoder.layer[0].intermediate.dense
        hook = dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        losses[dtype] = torch_mgca.train_step(model, torch_mgca.make_optimizer(model, config.optim), batch)
        hook.remove()
        assert seen == [torch.bfloat16 if dtype == "bfloat16" else torch.float32]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(losses["bfloat16"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)   # same model, bf16 rounding only
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        torch_mgca.TorchMgca(config)


@pytest.mark.slow
def test_compare_torch_cli_smoke(tmp_path):
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, os.path.join(helpers.ROOT, "benchmarks", "compare_torch.py"),
           f"--config={os.path.join(helpers.ROOT, 'configs', 'mgca.py')}:test", "--config.optim.clip_norm=0",
           "--steps=2", "--warmup=1", "--alternations=2", "--threads=1", f"--out={out}",
           "--jax_variant=no barrier:model.fusion_barrier=off,train.prng_impl=rbg"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["jax"]["params"] == r["torch"]["params"]
    assert len(r["rounds"]) == 2 and all(len(x["jax_s"]) == 2 and len(x["torch_s"]) == 2 for x in r["rounds"])
    all_jax = [s for x in r["rounds"] for s in x["jax_s"]]
    all_torch = [s for x in r["rounds"] for s in x["torch_s"]]
    assert r["jax"]["step_s"] == pytest.approx(float(np.median(all_jax)))
    assert r["ratio_jax_over_torch"] == pytest.approx(np.median(all_jax) / np.median(all_torch))
    assert "not the authors' code" in r["torch"]["what"] and "NOT the authors' code" in proc.stdout
    assert r["torch"]["threads"] == 1 and r["config"]["clip_norm"] == 0
    assert r["torch"]["device"] == "CPU, 1 threads" and r["jax"]["device"] == "cpu"
    (v,) = r["variants"]                             # the before/after row, timed in the same alternations
    assert v["label"] == "no barrier" and v["fields"] == {"model.fusion_barrier": "off", "train.prng_impl": "rbg"}
    assert len(r["rounds"][0]["variant0_s"]) == 2
    assert v["step_s"] == pytest.approx(float(np.median([s for x in r["rounds"] for s in x["variant0_s"]])))
    assert "| medvlp_jax, no barrier (model.fusion_barrier=off, train.prng_impl=rbg) |" in proc.stdout


def test_jax_variant_parsing_and_types():
    from benchmarks import compare_torch
    label, fields = compare_torch.parse_variant("b:model.fusion_barrier=off,train.batch_size=4,model.remat=True")
    config = compare_torch.apply_variant(helpers.load_config("mgca", "test"), fields)
    assert label == "b" and config.model.fusion_barrier == "off" and config.train.batch_size == 4
    assert config.model.remat is True
    with pytest.raises(ValueError, match="label"):
        compare_torch.parse_variant("no_colon")
    with pytest.raises(ValueError, match="no field"):
        compare_torch.apply_variant(helpers.load_config("mgca", "test"), {"model.nope": "1"})
