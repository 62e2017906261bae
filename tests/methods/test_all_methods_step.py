"""Every registered method: its config loads in every variant, and the full train step on 8 fake devices
(data=4, fsdp=2) gives the same loss and update as on 1 device."""
import os
import re

import jax
import numpy as np
import pytest

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.methods import OBJECTIVES
from tests import helpers

METHODS = OBJECTIVES.names()


def test_every_method_has_a_config_file():
    for name in METHODS:
        assert os.path.exists(os.path.join(helpers.ROOT, "configs", f"{name}.py")), name


@pytest.mark.parametrize("name", METHODS)
def test_config_variants_load(name):
    for variant in ("", "demo", "test"):
        c = helpers.load_config(name, variant)
        assert c.method.name == name
        assert c.train.batch_size > 0


# The whole step (encoders + objective + optimiser) on the demo's encoder type (ResNet with BatchNorm: statistics
# over the global batch) in the default run; every method on the test ViT with -m slow (~30 s each). Each
# objective alone, sharded against one device, is in the default run: tests/methods/test_objectives_sharded.py.
@pytest.mark.parametrize("name,arg", [pytest.param(m, "test", marks=pytest.mark.slow) for m in METHODS]
                         + [("convirt", "test,image=resnet")])
def test_sharded_train_step_equals_single_device(name, arg):
    """Every method on the test ViT, and the demo's encoder type (ResNet with BatchNorm: statistics over the
    global batch) once."""
    config = helpers.load_config(name, arg)
    batches = [helpers.random_batch(config, 8, seed=s) for s in range(2)]
    p1, h1, _, _ = helpers.run_steps(config, (1, 1), batches, steps_per_epoch=1)
    p8, h8, state8, _ = helpers.run_steps(config, (4, 2), batches, steps_per_epoch=1)
    # The fsdp rule really sharded something over the fsdp axis (else (4, 2) would only test data parallelism).
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state8.params))
    for a, b in zip(h1, h8):
        # The update was applied: a non-finite gradient is skipped by the step's guard, and two runs that skip
        # every update would agree trivially.
        assert np.isfinite(a["train/loss"]) and a["train/finite"] == 1 and b["train/finite"] == 1, (a, b)
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=2e-5, atol=1e-6)
    lr_bound = 2 * config.optim.lr * len(batches)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p8)):
        name = sharding_lib.path_name(path)
        # A bias whose shift BatchNorm removes downstream (MGCA's head input bias; the ViT's final LayerNorm bias
        # when mean-pooled features feed BatchNorm heads) has an identically zero gradient; Adam turns the float
        # noise of that zero into updates of up to +-lr, whose sign differs between reduction orders.
        atol = lr_bound if re.search(r"(_head/dense_in/bias|ln_final/bias)$", name) else 5e-5
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=5e-4, atol=atol, err_msg=name)
