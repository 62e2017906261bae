"""medvlp_jax.env: the environment report (python -m medvlp_jax.env) and a launcher start without backend noise."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from medvlp_jax import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("Unable to initialize backend", "oneDNN custom operations are on", "absl::InitializeLog")


def _clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the variables that change logging, plus ``overrides``."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("JAX_LOGGING_LEVEL", "JAX_DEBUG_LOG_MODULES", "TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    e.update(overrides)
    return e


def test_report_on_this_cpu_machine():
    rep = env.report()
    d = rep["devices"]
    assert d["backend"] == jax.default_backend() == "cpu"
    assert d["device_count"] == jax.device_count() == 8          # conftest's fake CPU devices
    assert d["device_kinds"] == {jax.devices()[0].device_kind: 8}
    v = rep["versions"]
    assert v["jax"] == jax.__version__ and v["jaxlib"] == importlib.metadata.version("jaxlib")
    import flax
    import optax
    assert v["flax"] == flax.__version__ and v["optax"] == optax.__version__
    assert v["tensorflow"] in (importlib.metadata.version(n) for n in ("tensorflow-cpu", "tensorflow")
                               if _installed(n))
    assert set(env.PACKAGES) == set(v)
    text = env.format_report(rep)
    assert f"jax                  {jax.__version__}" in text and "backend              cpu" in text


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_bf16_runs_on_cpu_and_nativeness_by_hardware():
    b = env.bf16_status()
    assert b["runs"] and 0 < b["max_rel_error"] < 2e-2          # bf16 rounding shows: not a float32 matmul
    assert b["native"] is False
    assert env.bf16_native("tpu")[0] is True
    assert env.bf16_native("gpu", "9.0")[0] is True and env.bf16_native("gpu", "8.0")[0] is True
    assert env.bf16_native("gpu", "7.5")[0] is False and env.bf16_native("gpu", None)[0] is None


def test_compilation_cache_status_follows_jax_config(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        off = env.compilation_cache_status()
        assert off["enabled"] is False and "JAX_COMPILATION_CACHE_DIR" in off["how"]
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        on = env.compilation_cache_status()
        assert on == {**on, "enabled": True, "dir": str(tmp_path), "writable": True}
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_quiet_backend_probe_respects_the_user(monkeypatch):
    logger = logging.getLogger(env.BACKEND_LOGGER)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("JAX_LOGGING_LEVEL", "INFO")
    assert env.quiet_backend_probe() is False and logger.level == logging.NOTSET
    monkeypatch.delenv("JAX_LOGGING_LEVEL")
    assert env.quiet_backend_probe() is True and logger.level == logging.WARNING
    assert env.quiet_backend_probe() is False                     # a level already set is left alone


def test_filtered_stderr_drops_only_the_known_lines(capfd):
    with env.filtered_stderr(env.TF_IMPORT_NOISE):
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"a real warning\n")
        print("python-level line", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["a real warning", "python-level line"]


def test_env_cli_json_and_expect():
    run = subprocess.run([sys.executable, "-m", "medvlp_jax.env", "--json"], capture_output=True, text=True,
                         env=_clean_env(), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    rep = json.loads(run.stdout)
    assert rep["devices"]["backend"] == "cpu" and rep["versions"]["jax"] == jax.__version__
    assert not any(n in run.stderr for n in NOISE), run.stderr
    bad = subprocess.run([sys.executable, "-m", "medvlp_jax.env", "--expect=tpu"], capture_output=True, text=True,
                         env=_clean_env(), cwd=ROOT, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: expected a tpu backend, JAX runs on cpu") and bad.stderr.count("\n") == 1


def test_tensorflow_imported_after_quiet_startup_prints_no_banner():
    """quiet_startup defers TF's import (a bad flag or config never pays its ~5 s) but filters its banner out of
    the first import wherever it happens, here the data pipeline's, after JAX's first device query; a plain
    import in the same environment prints the banner, so the filter is what hides it."""
    code = ("from medvlp_jax import env; env.quiet_startup(); import sys; assert 'tensorflow' not in sys.modules; "
            "import importlib.util; assert importlib.util.find_spec('tensorflow')  # a probe imports nothing\n"
            "import jax; jax.devices(); from medvlp_jax.data import pipeline; tf = pipeline.import_tf(); "
            "assert tf.constant(1).numpy() == 1")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd=ROOT,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    plain = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                           env=_clean_env(), cwd=ROOT, timeout=300)
    if not any(p.search(line) for line in plain.stderr.splitlines() for p in env.TF_IMPORT_NOISE):
        pytest.skip("this TensorFlow build prints no import banner")


def test_launcher_stderr_has_no_backend_or_tensorflow_noise(tmp_path):
    """pretrain.py up to its config check (past JAX's first device query): one error line only.

    The same command with JAX's and TF's logs asked for shows the backend line, so it is real on this machine
    (and TF's banner where this TF build prints one).
    """
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config=configs/convirt.py:test",
           f"--workdir={tmp_path / 'run'}"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.startswith("error: config.data.root='' holds no prepared data set")
    assert quiet.stderr.count("\n") == 1, quiet.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=_clean_env(JAX_LOGGING_LEVEL="INFO", TF_CPP_MIN_LOG_LEVEL="0"))
    assert loud.returncode == 2
    assert "Unable to initialize backend 'tpu'" in loud.stderr
