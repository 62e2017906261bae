"""The towers' self-attention against a heads-major formulation of the same arithmetic, forward + backward.

  python benchmarks/attention_layout.py                              # ViT-B/16 at 224 px, batch 8
  python benchmarks/attention_layout.py --batch=144                  # the paper batch
  python benchmarks/attention_layout.py --tokens=112 --dropout=0.1   # BERT's shape, with attention dropout

Times ``models.vit.SelfAttention`` (``einsum("bqhd,bkhd->bhqk")`` straight on the projections' [b, n, heads,
hd]) and a variant that transposes q, k, v to [b, heads, n, hd] before the two batched products (tried for
issue 14 and not adopted: docs/benchmarks.md), both on the same parameters and input: the jitted gradient of a
scalar of the outputs and probabilities with respect to the parameters and the input, alternately
(``--rounds``). Prints the medians and the largest difference of the values and gradients. One process, every
CPU; run it on a quiet machine.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 8, "batch size")
_TOKENS = flags.DEFINE_integer("tokens", 197, "sequence length (ViT-B/16 at 224 px: 197; the paper BERT: 112)")
_WIDTH = flags.DEFINE_integer("width", 768, "model width")
_HEADS = flags.DEFINE_integer("heads", 12, "attention heads")
_DROPOUT = flags.DEFINE_float("dropout", 0.0, "attention dropout (BERT: 0.1)")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "alternating timed calls per formulation")


def heads_major_attention():
    """``SelfAttention`` with q, k, v transposed to [b, heads, n, hd] before the products (the same arithmetic)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from medvlp_jax.models.vit import SelfAttention

    class HeadsMajorSelfAttention(SelfAttention):
        @nn.compact
        def __call__(self, x, bias=None, *, train=False):
            b, n, w = x.shape
            hd = w // self.num_heads
            dense = lambda name: nn.Dense(w, dtype=self.dtype, kernel_init=self.kernel_init, name=name)
            split = lambda t: t.reshape(b, n, self.num_heads, hd).transpose(0, 2, 1, 3)
            q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
            logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
            if bias is not None:
                logits = logits + bias.astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
            out = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(self.dtype), v)
            return dense("out")(out.transpose(0, 2, 1, 3).reshape(b, n, w)), probs

    return HeadsMajorSelfAttention


def compare(batch: int, tokens: int, width: int, heads: int, dropout: float, rounds: int) -> dict:
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from medvlp_jax.models.vit import SelfAttention

    x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, width))
    modules = {"sequence-major (models.vit.SelfAttention)": SelfAttention(heads, dropout_rate=dropout),
               "heads-major (variant)": heads_major_attention()(heads, dropout_rate=dropout)}
    params = next(iter(modules.values())).init(jax.random.PRNGKey(1), x)
    rng = jax.random.PRNGKey(2)

    def grad_fn(module):
        def loss(p, x):
            out, probs = module.apply(p, x, train=dropout > 0, rngs={"dropout": rng})
            return jnp.sum(out * out) * 1e-3 + probs[:, :, 0, 1:].mean()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    fns = {label: grad_fn(m) for label, m in modules.items()}
    results = {label: jax.block_until_ready(f(params, x)) for label, f in fns.items()}
    (v0, g0), (v1, g1) = results.values()
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    times = {label: [] for label in fns}
    for _ in range(rounds):
        for label, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(params, x))
            times[label].append(time.perf_counter() - t)
    flops = float(next(iter(fns.values())).lower(params, x).compile().cost_analysis().get("flops", 0.0))
    return {"shape": {"batch": batch, "tokens": tokens, "width": width, "heads": heads, "dropout": dropout},
            "median_s": {k: statistics.median(t) for k, t in times.items()},
            "min_s": {k: min(t) for k, t in times.items()}, "gflop": flops / 1e9,
            "value_diff": abs(float(v0) - float(v1)), "grad_max_abs_diff": diff,
            "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(), "jax": jax.__version__}


def main(argv):
    del argv
    r = compare(_BATCH.value, _TOKENS.value, _WIDTH.value, _HEADS.value, _DROPOUT.value, _ROUNDS.value)
    s = r["shape"]
    print(f"self-attention fwd+bwd, batch {s['batch']}, {s['tokens']} tokens, width {s['width']}, {s['heads']} "
          f"heads, dropout {s['dropout']}; {r['gflop']:.2f} GFLOP; median of {_ROUNDS.value} alternating calls; "
          f"load {r['load_average']:.1f} ({r['cpu_count']} CPUs), jax {r['jax']}\n")
    print("| formulation | ms (median) | ms (min) |\n|---|---|---|")
    for label in r["median_s"]:
        print(f"| {label} | {r['median_s'][label] * 1e3:.1f} | {r['min_s'][label] * 1e3:.1f} |")
    a, b = r["median_s"].values()
    print(f"\ntime, heads-major / sequence-major: {b / a:.2f} (< 1: the variant is faster). "
          f"|value diff| {r['value_diff']:.2e}, max |grad diff| {r['grad_max_abs_diff']:.2e}")


if __name__ == "__main__":
    app.run(main)
