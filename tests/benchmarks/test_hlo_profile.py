"""benchmarks/hlo_profile.py: HLO parsing, FLOPs of dots and convolutions, categories, and the trace table."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import hlo_profile
from medvlp_jax.models.vit import ViTBlock
from tests import helpers


def _module(fn, *args):
    return hlo_profile.parse_hlo(jax.jit(fn).lower(*args).compile().as_text())


def test_dot_and_convolution_flops_from_shapes():
    m, k, n = 24, 40, 16
    mod = _module(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n)))
    flops = sum(hlo_profile.instruction_flops(mod, i) for i in mod.computations[mod.entry])
    assert flops == 2 * m * k * n
    # A 4x4 stride-4 patch convolution: every output element is a 4*4*c multiply-add.
    b, s, c, o = 2, 16, 3, 8
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (4, 4), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mod = _module(conv, jnp.ones((b, s, s, c)), jnp.ones((4, 4, c, o)))
    flops = sum(hlo_profile.instruction_flops(mod, i) for i in mod.computations[mod.entry])
    assert flops == 2 * (b * (s // 4) ** 2 * o) * (4 * 4 * c)


@pytest.fixture(scope="module")
def block_module():
    """Forward + backward of one pre-LN ViT block (attention, softmax, layer norm, exact GELU, dense layers)."""
    block = ViTBlock(num_heads=2, mlp_dim=64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 32)), jnp.float32)
    params = block.init(jax.random.PRNGKey(0), x)

    def loss(p, x):
        y, _ = block.apply(p, x)
        return jnp.sum(y ** 2)

    return hlo_profile.parse_hlo(jax.jit(jax.grad(loss)).lower(params, x).compile().as_text())


def test_stack_frames_lead_to_our_source(block_module):
    """Every matmul of the block carries a stack whose innermost frame in our package is in models/vit.py."""
    mod = block_module
    dots = [i for c in mod.computations.values() for i in c if i.opcode == "dot"]
    assert dots
    package = os.path.join(os.path.realpath(helpers.ROOT), "medvlp_jax") + os.sep
    for d in dots:
        # By the package's own path: a checkout directory named medvlp_jax holding the virtualenv puts that
        # name in every library frame too.
        ours = [f for f in mod.stack(d.stack_frame_id) if os.path.realpath(f[0]).startswith(package)]
        assert ours and ours[0][0].endswith("models/vit.py"), (d.name, mod.stack(d.stack_frame_id))


def test_block_categories(block_module):
    mod = block_module
    cats = {hlo_profile.categorize(mod, i, hlo_profile._Source(helpers.ROOT))
            for i in mod.computations[mod.entry]}
    for want in ("matmul: dense (QKV/out projections, MLP, heads)", "matmul: attention (QK^T, PV)",
                 "layer norm", "GELU", "softmax"):
        assert want in cats, (want, cats)
    assert cats <= set(hlo_profile.CATEGORIES)


def test_profile_table_sums_entry_thunks(block_module):
    """Trace events of entry instructions are summed per category and divided by the step count; other events
    (nested bodies, runtime bookkeeping) are counted as unmatched, not timed."""
    mod = block_module
    entry = mod.computations[mod.entry]
    events = [{"name": i.name, "dur": 1000.0 * (n + 1), "ph": "X"} for n, i in enumerate(entry)]
    events += [{"name": "ThunkExecutor::Execute", "dur": 5e6, "ph": "X"}]
    table = hlo_profile.profile_table(mod, events * 2, steps=2, source_root=helpers.ROOT)
    want = sum(n + 1 for n in range(len(entry)))                       # ms per step
    assert table["total_ms"] == pytest.approx(want)
    assert sum(r["ms"] for r in table["categories"]) == pytest.approx(want)
    assert table["unmatched_events"] == 2
    by_cat = {}
    for n, i in enumerate(entry):
        c = hlo_profile.categorize(mod, i, hlo_profile._Source(helpers.ROOT))
        by_cat[c] = by_cat.get(c, 0.0) + n + 1
    assert {r["category"]: r["ms"] for r in table["categories"]} == pytest.approx(by_cat)
    assert "| **sum of thunk times** |" in hlo_profile.markdown_table(table)
