"""launch/benchmark.py and benchmark_lib: FLOP counting, the peak table, and a smoke run (no timing asserts)."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medvlp_jax import benchmark_lib, sharding as sharding_lib
from medvlp_jax.data.example_batch import example_batch_for
from medvlp_jax.data.sources import synthetic
from tests import helpers


def test_cost_analysis_is_per_device_and_counts_matmul_flops():
    m, k, n = 64, 96, 40
    x, w = jnp.ones((m, k)), jnp.ones((k, n))
    one = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    assert benchmark_lib._cost_flops(one) == pytest.approx(2 * m * k * n, rel=0.01)
    mesh = sharding_lib.make_mesh({"data": 8, "fsdp": 1}, jax.devices()[:8])
    sharded = jax.jit(lambda a, b: a @ b, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
                      ).lower(x, w).compile()
    # XLA reports one partition of an SPMD program: time_step multiplies by the device count.
    assert benchmark_lib._cost_flops(sharded) * 8 == pytest.approx(2 * m * k * n, rel=0.01)


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                       ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200", 989e12)])
def test_peak_table(kind, peak):
    dev = types.SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind)
    assert benchmark_lib.peak_flops(dev)[0] == peak
    assert np.isnan(benchmark_lib.peak_flops(types.SimpleNamespace(platform="gpu", device_kind="Mystery"))[0])


def test_with_shape_changes_the_step_shapes_consistently():
    c = helpers.load_config("convirt")
    d = benchmark_lib.with_shape(c, batch_size=16, text_len=24, image_size=48)
    b = example_batch_for(d, d.train.batch_size, seed=0)
    assert b["image"].shape == (16, 48, 48, d.data.channels) and b["input_ids"].shape == (16, 24)
    assert d.model.image.image_size == 48 and d.data.resize >= 48 and c.train.batch_size == 8


def test_objective_cost_counts_the_contrastive_matmuls():
    """ConVIRT's objective alone is the [b, d] x [d, b] similarity matmul (forward, and two for the backward)
    plus O(b^2) and O(b d) element-wise work: between 6 b^2 d and twice that, and ~4x for twice the batch."""
    c = helpers.load_config("convirt")
    d = c.model.proj.dim
    costs = {b: benchmark_lib.objective_cost(benchmark_lib.with_shape(c, batch_size=b), devices=jax.devices()[:1],
                                             steps=1, warmup=0)["flops"] for b in (8, 16)}
    for b, flops in costs.items():
        assert 6 * b * b * d <= flops <= 12 * b * b * d, (b, flops)
    assert 3.0 < costs[16] / costs[8] < 4.5


def test_unrolled_config_removes_every_loop():
    c = helpers.load_config("mgca")
    c.model.remat = True
    c.optim.grad_accum_steps = 2
    u, changed = benchmark_lib.unrolled_config(c)
    assert changed == ["method.local_chunk=None", "model.remat=False", "optim.grad_accum_steps=1"]
    assert u.method.local_chunk is None and not u.model.remat and u.optim.grad_accum_steps == 1
    assert c.method.local_chunk == 16 and c.model.remat                    # the original is untouched
    assert benchmark_lib.unrolled_config(u)[1] == []
    g, changed = benchmark_lib.unrolled_config(helpers.load_config("gloria"))
    assert changed == ["method.text_chunk=None"] and g.method.text_chunk is None


@pytest.mark.slow
def test_chunked_steps_are_counted_in_full():
    """XLA counts a loop body once: the FLOPs of a chunked GLoRIA step (two chunks of 8 texts) are read from the
    loop-free variant, so they equal the unchunked step's, for the step and for the objective alone."""
    c = helpers.load_config("gloria")
    c.train.batch_size = 16
    one = jax.devices()[:1]
    got = {}
    for chunk in (8, None):
        c.method.text_chunk = chunk
        r = benchmark_lib.time_step(c, devices=one, steps=1, warmup=0)
        got[chunk] = (r.flops_per_step, benchmark_lib.objective_cost(c, devices=one, steps=1, warmup=0)["flops"],
                      r.flops_source)
    assert got[8][:2] == got[None][:2]
    assert got[8][2] == "loop-free variant: method.text_chunk=None" and got[None][2] == "compiled step"


@pytest.mark.slow
def test_benchmark_cli_smoke(tmp_path):
    root = str(tmp_path / "data")
    synthetic.prepare_synthetic(root, num_train=32, num_test=8, num_shards=2)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(helpers.ROOT, "launch", "benchmark.py"),
           f"--config={os.path.join(helpers.ROOT, 'configs', 'convirt.py')}:test", "--steps=2", "--warmup=1",
           "--scale=batch_size:16", "--scale_steps=1", f"--data_root={root}", "--pipeline_batches=3",
           f"--out={out}", f"--markdown={tmp_path / 'bench.md'}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    base, (row,) = r["base"], r["scaling"]
    assert base["num_devices"] == 2 and base["batch_size"] == 8 and row["batch_size"] == 16
    assert len(base["step_s_all"]) == 2 and base["images_per_s"] == pytest.approx(8 / base["step_s"])
    # Twice the batch: close to twice the FLOPs (the optimizer update does not grow with the batch).
    assert 1.5 < row["flops_per_step"] / base["flops_per_step"] < 2.05
    assert base["peak_memory_bytes"] > 0 and 0 < base["mfu"]
    assert r["pipeline"]["examples_per_s"] > 0 and r["environment"]["platform"] == "cpu"
    assert 0 < r["objective"]["share_of_step_flops"] < 0.01 and "Objective alone" in proc.stdout
    assert "| base | 8 | 16 | 32 |" in (tmp_path / "bench.md").read_text() and "| base |" in proc.stdout


def test_loops_with_matmuls_counts_only_loops_over_matmuls():
    x = jnp.ones((4, 3, 3))
    mapped = jax.make_jaxpr(lambda x: jax.lax.map(lambda r: r @ r.T, x))(x)
    elementwise = jax.make_jaxpr(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0, x))(x)
    nested = jax.make_jaxpr(jax.jit(lambda x: jnp.sum(jax.lax.map(lambda r: jnp.sin(r) @ r, x)) + jnp.sum(x)))(x)
    plain = jax.make_jaxpr(lambda x: x @ x)(x)
    assert [benchmark_lib.loops_with_matmuls(j) for j in (mapped, elementwise, nested, plain)] == [1, 0, 1, 0]


def test_flop_count_variant_skips_the_second_compile_when_no_loop_holds_a_matmul():
    """MGCA's pair-wise local terms never use local_chunk: the step is counted as compiled. With the "batch" local
    negatives the chunks are a lax.map over matmuls: the loop-free variant is needed, as with remat."""
    c = helpers.load_config("mgca")

    def jaxpr(cfg):
        b = benchmark_lib._build(cfg, jax.devices()[:1], materialize=False)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(b["mesh"]))
                 for k, v in example_batch_for(cfg, cfg.train.batch_size, seed=0).items()}
        return b["step"].trace(b["state"], batch).jaxpr

    cfg, changed = benchmark_lib.flop_count_variant(c, jaxpr(c))
    assert changed == [] and cfg is c
    c.method.local_negatives, c.method.local_chunk = "batch", 4
    cfg, changed = benchmark_lib.flop_count_variant(c, jaxpr(c))
    assert changed == ["method.local_chunk=None"] and cfg.method.local_chunk is None
    c.method.local_negatives, c.model.remat = "pair", True
    assert benchmark_lib.flop_count_variant(c, jaxpr(c))[1] == ["method.local_chunk=None", "model.remat=False"]
