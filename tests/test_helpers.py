"""tests/helpers.assert_trees_close: accepts float rounding judged at a leaf's scale, rejects small real bugs."""
import numpy as np
import pytest

from tests.helpers import assert_trees_close


def _tree(seed: int = 0) -> dict[str, np.ndarray]:
    """A gradient-like tree: leaves of different scales, one element near zero, one leaf exactly zero."""
    rng = np.random.default_rng(seed)
    kernel = (0.2 * rng.standard_normal((16, 16))).astype(np.float32)
    kernel[3, 5] = 1.76e-6                                          # an element that happens to land near 0
    return {"kernel": kernel, "bias": (3.0 * rng.standard_normal(16)).astype(np.float32),
            "key_bias": np.zeros(16, np.float32)}                   # exact gradient 0 (softmax cancels it)


def _rounding(tree: dict[str, np.ndarray], rel: float, seed: int = 1) -> dict[str, np.ndarray]:
    """Noise of ``rel`` times each leaf's max magnitude; the exact-zero leaf gets ``rel`` times the helper's
    floor (1e-3 of the tree's max magnitude)."""
    rng = np.random.default_rng(seed)
    top = max(np.abs(v).max() for v in tree.values())
    return {k: v + rel * (np.abs(v).max() or 1e-3 * top) * rng.uniform(-1, 1, v.shape).astype(np.float32)
            for k, v in tree.items()}


def test_rounding_at_the_leaf_scale_passes_where_an_elementwise_tolerance_fails():
    want = _tree()
    got = _rounding(want, 1e-6)
    got["kernel"][3, 5] = want["kernel"][3, 5] + 1.03e-6             # issue 16: max rel difference 0.585
    assert_trees_close(got, want)
    with pytest.raises(AssertionError):                              # the old per-element check
        np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bug", ["leaf_scaled", "one_element", "zero_leaf_nonzero", "leaves_swapped"])
def test_small_real_differences_fail(bug):
    want = _tree()
    got = _rounding(want, 1e-6)
    if bug == "leaf_scaled":                                        # e.g. a block's output off by 1e-4
        got["bias"] = got["bias"] * np.float32(1 + 1e-4)
    elif bug == "one_element":                                      # one element off by 1e-4 of its leaf's max
        got["kernel"][7, 2] += 1e-4 * np.abs(want["kernel"]).max()
    elif bug == "zero_leaf_nonzero":                                # a leaf that must be 0 gets a real gradient
        got["key_bias"][0] = 1e-4 * np.abs(want["bias"]).max()
    else:                                                           # same shapes, wrong leaf
        got["kernel"] = got["kernel"].T.copy()
    with pytest.raises(AssertionError):
        assert_trees_close(got, want)


def test_structure_shape_and_nan_fail():
    want = _tree()
    with pytest.raises(AssertionError, match="leaves"):
        assert_trees_close({k: want[k] for k in ("kernel", "bias")}, want)
    with pytest.raises(AssertionError, match="shape"):
        assert_trees_close({**want, "bias": want["bias"][:8]}, want)
    nan = {**want, "kernel": want["kernel"].copy()}
    nan["kernel"][0, 0] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_trees_close(nan, want)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_trees_close(want, nan)
    zeros = {"a": np.zeros(3), "b": np.zeros(2)}                    # an all-zero tree must match exactly
    assert_trees_close(zeros, zeros)
    with pytest.raises(AssertionError):
        assert_trees_close({"a": np.zeros(3), "b": np.array([0.0, 1e-30])}, zeros)
