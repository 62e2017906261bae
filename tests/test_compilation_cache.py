"""The launchers' persistent compilation cache (env.setup_compilation_cache): where it goes, the off switch, a
second process loading the executable the first one stored, and the launchers turning it on."""
import glob
import json
import os
import subprocess
import sys

from medvlp_jax import env
from tests import helpers

PROBE = """
import sys, jax, jax.numpy as jnp
from medvlp_jax import env
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
path = env.setup_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(repr(path), len(hits))
"""


def _probe(tmp_path, value):
    e = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    e.update(MEDVLP_COMPILATION_CACHE=value, PYTHONPATH=helpers.ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    path, hits = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return eval(path), int(hits)


def test_cache_dir_resolution(tmp_path):
    default = env.launcher_cache_dir({})
    assert default == os.path.join(os.path.expanduser("~"), ".cache", "medvlp_jax", "jax_cache")
    assert env.launcher_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/medvlp_jax/jax_cache"
    assert env.launcher_cache_dir({"XDG_CACHE_HOME": "/x"}, jax_dir="/jaxdir") == "/jaxdir"   # JAX's own setting
    assert env.launcher_cache_dir({"MEDVLP_COMPILATION_CACHE": "/mine"}, jax_dir="/jaxdir") == "/mine"
    for off in ("off", "OFF", "0", "false", "none", ""):
        assert env.launcher_cache_dir({"MEDVLP_COMPILATION_CACHE": off}, jax_dir="/jaxdir") is None


def test_second_process_loads_the_stored_executable(tmp_path):
    cache = tmp_path / "cache"
    assert _probe(tmp_path, str(cache)) == (str(cache), 0)          # first process: every program compiled
    assert glob.glob(str(cache / "jit_*-cache"))
    path, hits = _probe(tmp_path, str(cache))                        # second: loaded (one hit per program)
    assert path == str(cache) and hits >= 1


def test_off_switch_stores_nothing(tmp_path):
    assert _probe(tmp_path, "off") == (None, 0)
    assert _probe(tmp_path, "off") == (None, 0)


def test_unwritable_directory_is_reported_and_left_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    e = dict(os.environ, MEDVLP_COMPILATION_CACHE=str(blocker / "cache"), PYTHONPATH=helpers.ROOT)
    out = subprocess.run([sys.executable, "-c", "from medvlp_jax import env; print(env.setup_compilation_cache())"],
                         env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "None"
    assert "cannot be created" in out.stderr and "MEDVLP_COMPILATION_CACHE" in out.stderr


def test_launchers_store_the_compiled_step(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, os.path.join(helpers.ROOT, "launch", "benchmark.py"),
           f"--config={os.path.join(helpers.ROOT, 'configs', 'convirt.py')}:test", "--steps=1", "--warmup=0",
           "--scale=none", f"--out={tmp_path / 'b.json'}"]
    e = dict(os.environ, MEDVLP_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert glob.glob(str(cache / "jit_train_step-*-cache"))
    assert json.loads((tmp_path / "b.json").read_text())["environment"]["compilation_cache"] == str(cache)
