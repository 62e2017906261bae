"""Faults: SIGTERM saves and exits cleanly, half-written checkpoints are ignored, non-finite steps skip or stop."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax import config_lib
from medvlp_jax.data import pipeline, tokenizer as tokenizer_lib
from medvlp_jax.data.sources import synthetic
from medvlp_jax.methods import OBJECTIVES
from medvlp_jax.train import checkpoint as ckpt_lib
from medvlp_jax.train.state import TrainState
from tests import helpers


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.prepare_synthetic(root, num_train=24, num_test=8, num_shards=2)
    return root


# ------------------------------------------------------------------------------------------------------------
# SIGTERM (subprocess): checkpoint at the current step, exit 0; the rerun resumes there, past half-written saves.

def _launch(workdir, root, total):
    return [sys.executable, os.path.join(helpers.ROOT, "launch", "pretrain.py"),
            f"--config={os.path.join(helpers.ROOT, 'configs', 'convirt.py')}:test", f"--workdir={workdir}",
            f"--config.data.root={root}", f"--config.data.tokenizer_dir={root}/tokenizer",
            f"--config.train.total_steps={total}", "--config.train.ckpt_every_steps=1000",
            "--config.train.log_every_steps=50", "--config.train.eval_at_end=False"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """2 fake devices, fewer XLA optimisations, and a persistent compilation cache shared by the runs (the
    rerun then compiles nothing)."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_past_half_written_ones(tmp_path, data_root, env):
    work, total = tmp_path / "run", 200
    proc = subprocess.Popen(_launch(work, data_root, total), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    compiled = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "compiled the train step" in line:
                compiled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert compiled.wait(timeout=300), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)            # the handler is installed before compiling: the loop is running
    t0 = time.time()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    assert time.time() - t0 < 30, f"{time.time() - t0:.1f} s from SIGTERM to exit"
    reader.join(timeout=10)
    err = "".join(lines)
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 1 <= steps[0] < total, (steps, err[-2000:])
    k = steps[0]
    assert f"preempted: checkpoint saved at step {k}" in err
    assert (work / "checkpoints" / str(k) / ckpt_lib.COMMIT_FILE).exists()
    position = json.loads((work / "checkpoints" / str(k) / "data" / "metadata").read_text())
    assert position == {"step": k, "seed": 0, "examples_seen": k * 8}

    # Two kinds of half-written checkpoint after k: a step directory without its commit marker (an interrupted
    # copy / non-atomic file system) and orbax's temporary directory (a kill during an async save).
    ck = work / "checkpoints"
    shutil.copytree(ck / str(k), ck / str(k + 1))
    os.remove(ck / str(k + 1) / ckpt_lib.COMMIT_FILE)
    shutil.copytree(ck / str(k + 1), ck / f"{k + 2}.orbax-checkpoint-tmp-1234")
    rerun = subprocess.run(_launch(work, data_root, total), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ck} at step {k}" in rerun.stderr
    assert "ignoring half-written checkpoint" in rerun.stderr and f"using step {k}" in rerun.stderr
    assert "ignoring interrupted checkpoint save" in rerun.stderr
    final = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
    assert final[-1] == total and glob.glob(str(ck / f"{k + 1}.incomplete-*"))


# ------------------------------------------------------------------------------------------------------------
# Half-written checkpoints (in process): ignored with a log line, the previous step is restored, saving goes on.

def _tiny_state(step: int, value: float) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"encoders": {"w": jnp.full((4, 3), value)},
                                                                 "method": {}},
                      model_state={}, opt_state={"mu": jnp.zeros((4, 3))}, rng=jax.random.PRNGKey(0),
                      ema_params=None, nonfinite_steps=jnp.zeros((), jnp.int32))


def test_half_written_checkpoints_are_ignored_and_the_previous_one_is_used(tmp_path, caplog):
    ck = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5)
    for step in (2, 4):
        ck.save(step, _tiny_state(step, float(step)), {"step": step, "seed": 0, "examples_seen": 8 * step})
    ck.close()
    d = tmp_path / "checkpoints"
    shutil.copytree(d / "4", d / "6")                       # no commit marker: must not count as step 6
    os.remove(d / "6" / ckpt_lib.COMMIT_FILE)
    shutil.copytree(d / "6", d / "8.orbax-checkpoint-tmp-99")
    with caplog.at_level("WARNING", logger="medvlp_jax"):
        ck = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5)
    assert ck.latest_step() == 4
    msgs = " | ".join(caplog.messages)
    assert "ignoring half-written checkpoint" in msgs and "using step 4" in msgs
    assert "ignoring interrupted checkpoint save" in msgs and "8.orbax-checkpoint-tmp-99" in msgs
    abstract = jax.eval_shape(lambda: _tiny_state(0, 0.0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, pos = ck.restore(4, abstract, jax.tree.map(lambda _: one, abstract))
    assert int(state.step) == 4 and float(state.params["encoders"]["w"][0, 0]) == 4.0 and pos["step"] == 4
    assert ck.save(6, _tiny_state(6, 6.0), {"step": 6, "seed": 0, "examples_seen": 48})   # step 6 is free again
    ck.close()
    assert ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5).latest_step() == 6


# ------------------------------------------------------------------------------------------------------------
# Non-finite steps end to end (loop.run in process): an objective that returns NaN for batches holding one
# poisoned record. "stop" names the step and the record indices even between log steps; "skip" counts.

POISON = 5


def _nan_on_record(cfg, *, steps_per_epoch):
    convirt_cfg = {k: v for k, v in cfg.items() if k != "poison_index"}
    base = OBJECTIVES.get("convirt")(convirt_cfg, steps_per_epoch=steps_per_epoch)

    def loss(params, out, batch, ctx):
        value, metrics = base.loss(params, out, batch, ctx)
        return jnp.where(jnp.any(batch["index"] == cfg.poison_index), jnp.nan, value), metrics

    return base._replace(name="convirt_nan_on_record", loss=loss)


def _config(root, mode, total):
    c = helpers.load_config("convirt")
    c.method.name = "convirt_nan_on_record"
    c.method.poison_index = POISON
    c.data.root, c.data.tokenizer_dir = root, os.path.join(root, "tokenizer")
    c.train.total_steps, c.train.log_every_steps, c.train.ckpt_every_steps = total, 4, 1000
    c.train.nonfinite, c.train.eval_at_end = mode, False
    return c


def _poisoned_steps(config, total):
    """Steps (1-based) whose batch holds the poisoned record, from the pipeline itself."""
    it = pipeline.make_train_iter(config, tokenizer_lib.load_tokenizer(config.data.tokenizer_dir), start_step=0)
    return [s for s in range(1, total + 1) if POISON in next(it)["index"]]


@pytest.fixture
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the in-process runs below (the second run then compiles nothing);
    restored afterwards. Uses jax._src.compilation_cache.reset_cache; without it the test is only slower."""
    try:
        from jax._src import compilation_cache as cc
    except ImportError:
        yield
        return
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    new = (str(tmp_path_factory.getbasetemp() / "jax_cache_inprocess"), 0.0, -1)
    for n, v in zip(names, new):
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture
def nan_on_record_objective():
    """Registered for the test only, so registry-driven tests (every method has a config...) never see it."""
    OBJECTIVES.register("convirt_nan_on_record")(_nan_on_record)
    yield
    OBJECTIVES.unregister("convirt_nan_on_record")


def test_nonfinite_stop_names_step_and_records_and_skip_counts(tmp_path, data_root, compilation_cache,
                                                                nan_on_record_objective):
    from medvlp_jax.train import loop
    total = 7                                    # 24 examples / batch 8: the poisoned record comes once per 3 steps
    stop_cfg = _config(data_root, "stop", total)
    poisoned = _poisoned_steps(stop_cfg, total)
    assert len(poisoned) >= 2 and poisoned[0] % 4, poisoned       # the first one falls between log steps
    with pytest.raises(FloatingPointError) as e:
        loop.run(stop_cfg, str(tmp_path / "stop"))
    msg = str(e.value)
    first = poisoned[0]
    assert f"step {first}: record indices [" in msg and "'train'" in msg, msg
    rows = json.loads(msg.split(f"step {first}: record indices ", 1)[1].split("]", 1)[0] + "]")
    assert POISON in rows and len(rows) == 8
    # Nothing after the first log step that follows the bad step ran (it raised there).
    assert not os.path.exists(tmp_path / "stop" / "checkpoints" / str(total))

    loop.run(_config(data_root, "skip", total), str(tmp_path / "skip"))
    logged = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert logged[-1]["step"] == total and logged[-1]["train/nonfinite_steps"] == len(poisoned)


# ------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints (in process): a truncated array file, garbled metadata, a missing file in the newest step.
# The run resumes from the newest step that restores (one warning naming step, file and reason; the bad step is
# set aside); evaluation falls back without moving anything; an explicit step that does not restore is an error.

def _state_256(step: int, value: float) -> TrainState:
    """Arrays large enough that orbax stores them in data files rather than inline in its index."""
    rng = np.random.default_rng(step)
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      params={"encoders": {"w": jnp.asarray(rng.normal(size=(128, 96)) + value, jnp.float32)},
                              "method": {}},
                      model_state={}, opt_state={"mu": jnp.asarray(rng.normal(size=(128, 96)), jnp.float32)},
                      rng=jax.random.PRNGKey(0), ema_params=None, nonfinite_steps=jnp.zeros((), jnp.int32))


def _largest(directory):
    files = [p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate_array_file(step_dir):
    path = _largest(os.path.join(step_dir, "state", "d"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _garble_metadata(step_dir):
    path = os.path.join(step_dir, "state", "_METADATA")
    with open(path, "w") as f:
        f.write('{"tree_metadata": {garbled')
    return path


def _remove_array_file(step_dir):
    path = _largest(os.path.join(step_dir, "state", "d"))
    os.remove(path)
    return path


CORRUPTIONS = {"truncated array file": _truncate_array_file, "garbled _METADATA": _garble_metadata,
               "missing array file": _remove_array_file}


def _two_checkpoints(workdir):
    ck = ckpt_lib.Checkpointer(str(workdir), every_steps=2, keep=5)
    for step in (2, 4):
        ck.save(step, _state_256(step, float(step)), {"step": step, "seed": 0, "examples_seen": 8 * step})
    ck.close()
    abstract = jax.eval_shape(lambda: _state_256(0, 0.0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract, jax.tree.map(lambda _: one, abstract)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path, caplog, corruption):
    abstract, shardings = _two_checkpoints(tmp_path)
    d = tmp_path / "checkpoints"
    bad_file = CORRUPTIONS[corruption](str(d / "4"))

    # Evaluation: falls back to step 2 and moves nothing; asking for step 4 explicitly is an error naming it.
    state, step = ckpt_lib.restore_params(str(tmp_path), abstract, shardings)
    assert step == 2 and (d / "4").is_dir()
    np.testing.assert_array_equal(np.asarray(state.params["encoders"]["w"]),
                                  np.asarray(_state_256(2, 2.0).params["encoders"]["w"]))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 4 does not restore: .* is ") as e:
        ckpt_lib.restore_params(str(tmp_path), abstract, shardings, step=4)
    assert "\n" not in str(e.value)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"--step=3: no checkpoint of that step .*\[2, 4\]"):
        ckpt_lib.restore_params(str(tmp_path), abstract, shardings, step=3)

    # Training: one warning naming step, file and reason; step 4 set aside; step 2 restored; step 4 saves again.
    with caplog.at_level("WARNING", logger="medvlp_jax"):
        ck = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5)
        state, position, step = ck.restore_latest(abstract, shardings)
    assert step == 2 and position["step"] == 2 and int(state.step) == 2
    warning = next(m for m in caplog.messages if "does not restore" in m)
    assert "step 4" in warning and os.path.basename(bad_file) in warning, (warning, bad_file)
    assert any("moved the unreadable checkpoint step 4" in m for m in caplog.messages)
    assert glob.glob(str(d / "4.corrupt-*")) and not (d / "4").exists()
    assert ck.save(4, _state_256(4, 4.0), {"step": 4, "seed": 0, "examples_seen": 32})
    ck.close()
    assert ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5).latest_step() == 4


def test_no_restorable_checkpoint_is_one_error_line_and_nothing_is_moved(tmp_path):
    abstract, shardings = _two_checkpoints(tmp_path)
    d = tmp_path / "checkpoints"
    _truncate_array_file(str(d / "4"))
    _garble_metadata(str(d / "2"))
    ck = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=5)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint in .* restores \(newest: step 4, .*2 tried") \
            as e:
        ck.restore_latest(abstract, shardings)
    ck.close()
    assert "\n" not in str(e.value)
    assert (d / "4").is_dir() and (d / "2").is_dir() and not glob.glob(str(d / "*.corrupt-*"))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in"):
        ckpt_lib.restore_params(str(tmp_path), abstract, shardings)


def test_diagnose_names_the_garbled_json_file(tmp_path):
    abstract, _ = _two_checkpoints(tmp_path)
    step_dir = str(tmp_path / "checkpoints" / "4")
    path = _garble_metadata(step_dir)
    file, reason = ckpt_lib.diagnose(step_dir, json.JSONDecodeError("Expecting value", "x", 0))
    assert file == path and reason.startswith("not valid JSON")


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C (subprocess): the first one saves a checkpoint at the current step and exits promptly (130); the rerun
# resumes there and metrics.jsonl holds no step twice.

@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_promptly_and_the_resume_writes_each_metric_row_once(tmp_path, data_root,
                                                                                             env):
    work, total = tmp_path / "run", 200
    cmd = _launch(work, data_root, total)
    cmd[cmd.index("--config.train.log_every_steps=50")] = "--config.train.log_every_steps=1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    logged = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "[3] " in line:                  # a few metric rows are written: the loop is running
                logged.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert logged.wait(timeout=300), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    assert proc.wait(timeout=120) == 130, "".join(lines)[-3000:]
    exit_seconds = time.time() - t0
    reader.join(timeout=10)
    err = "".join(lines)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < total, (steps, err[-2000:])
    assert f"interrupted: checkpoint saved at step {steps[0]}" in err
    assert exit_seconds < 30, f"{exit_seconds:.1f} s from Ctrl-C to exit"
    rows = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
    assert rows[-1] >= steps[0]

    # Rows past the checkpoint (none here, since the save is at the interrupted step) plus a fabricated one past
    # it, as a kill between a log and a checkpoint leaves: the resumed run drops them and writes each step once.
    with open(work / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": steps[0] + 1, "train/loss": -1.0}) + "\n")
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert all(r["train/loss"] != -1.0 for r in rows)


def test_first_sigint_sets_the_flag_second_raises(monkeypatch):
    from medvlp_jax.train import faults
    watch = faults.PreemptionWatch()
    try:
        assert not watch.reached(1)
        signal.raise_signal(signal.SIGINT)
        assert watch.reached(2) and watch.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is not watch._on_signal


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    from medvlp_jax import logging_lib
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "x"')
    assert logging_lib.drop_rows_after(str(path), 4) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert logging_lib.drop_rows_after(str(path), 4) == 0


def test_allowed_config_change_keeps_the_old_config(tmp_path, caplog):
    from medvlp_jax.train import loop
    c = helpers.load_config("convirt", "test")
    (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=1))
    loop.check_resume_config(c, str(tmp_path))                            # same config: nothing to say
    c.train.total_steps = 99
    with pytest.raises(config_lib.ConfigError, match="differs in train.total_steps"):
        loop.check_resume_config(c, str(tmp_path))
    with caplog.at_level("WARNING", logger="medvlp_jax"):
        loop.check_resume_config(c, str(tmp_path), allow_change=True)
    assert any("train.total_steps" in m and "--allow_config_change" in m for m in caplog.messages)
    kept = glob.glob(str(tmp_path / "config.before-*.json"))
    assert len(kept) == 1 and json.load(open(kept[0]))["train"]["total_steps"] == 6


def test_objective_check_warns_once_when_sista_sia_has_no_negatives(tmp_path, data_root, caplog):
    """With fn_threshold=-1 every pair is a false negative from step 1: SIA is 0 with no gradient, which the
    loss alone does not show; the loop's check says so, once, naming the remedy."""
    from medvlp_jax.train import loop
    c = helpers.load_config("sista")
    c.method.fn_threshold, c.method.sia_warmup_epochs = -1.0, 0.0
    c.data.root, c.data.tokenizer_dir = data_root, os.path.join(data_root, "tokenizer")
    c.train.total_steps, c.train.log_every_steps, c.train.ckpt_every_steps, c.train.eval_at_end = 3, 1, 1000, False
    with caplog.at_level("WARNING", logger="medvlp_jax"):
        loop.run(c, str(tmp_path / "sista"))
    warnings = [r.getMessage() for r in caplog.records if "no negatives left" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 1: SISTA: 100.0% of the batch's negative pairs"), \
        warnings
    assert "fn_threshold=-1.0" in warnings[0] and "sia_similarity=" in warnings[0]
    logged = [json.loads(line) for line in open(tmp_path / "sista" / "metrics.jsonl")]
    assert [r["loss/sia"] for r in logged] == [0.0, 0.0, 0.0]
