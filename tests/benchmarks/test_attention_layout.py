"""benchmarks/attention_layout.py: its heads-major variant equals the towers' attention (values and gradients, with
and without attention dropout), and the script runs (no timing asserted)."""
import os
import subprocess
import sys

import pytest

from benchmarks import attention_layout
from tests import helpers


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_heads_major_variant_equals_the_towers_attention(dropout):
    r = attention_layout.compare(batch=2, tokens=5, width=16, heads=4, dropout=dropout, rounds=1)
    assert r["value_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5, r
    assert r["gflop"] > 0 and set(r["median_s"]) == {"sequence-major (models.vit.SelfAttention)",
                                                      "heads-major (variant)"}


def test_script_prints_both_rows():
    script = os.path.join(helpers.ROOT, "benchmarks", "attention_layout.py")
    out = subprocess.run([sys.executable, script, "--batch=2", "--tokens=9", "--width=32", "--heads=4", "--rounds=2"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "| sequence-major (models.vit.SelfAttention) |" in out and "| heads-major (variant) |" in out
    assert "heads-major / sequence-major" in out
