"""Two local processes (jax.distributed, 4 fake CPU devices each) train like one process with 8 devices.

Same global batches: the pipeline deals the shard files to ``config.data.num_streams`` streams and process p
owns a contiguous block of them, so with ``num_streams=2`` one process (reading both streams) and two
processes (one stream each) see identical global batches in the same row order (pipeline docstring). The
comparison is therefore exact up to float reduction order: same data, same initialisation, same dropout
keys, and the only difference is that gradients and the contrastive similarity are reduced across two
processes (gloo) instead of inside one. The mesh is (data 4, fsdp 2), so FSDP-sharded parameters span the
processes. The checkpoints are written by both processes together (each its own shards), restored here by
a third, single process, and a 2-process rerun resumes from them; only process 0 logs progress.

Uses a config wrapper so the test does not depend on ``config.data.num_streams`` being in the base config.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from medvlp_jax.data.sources import synthetic
from tests import helpers

pytestmark = pytest.mark.multiprocess

WRAPPER = '''
import importlib.util
def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("convirt_cfg", {path!r})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    if "num_streams" not in c.data:
        c.data.num_streams = 0
    return c
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(tmp_path, workdir, root, total, *extra):
    cfg = tmp_path / "cfg.py"
    if not cfg.exists():
        cfg.write_text(WRAPPER.format(path=os.path.join(helpers.ROOT, "configs", "convirt.py")))
    return [sys.executable, os.path.join(helpers.ROOT, "launch", "pretrain.py"), f"--config={cfg}:test",
            f"--workdir={workdir}", f"--config.data.root={root}", f"--config.data.tokenizer_dir={root}/tokenizer",
            f"--config.train.total_steps={total}", "--config.train.ckpt_every_steps=3",
            "--config.train.log_every_steps=2", "--config.train.eval_at_end=False", "--config.mesh.data=4",
            "--config.mesh.fsdp=2", "--config.data.num_streams=2", *extra]


def _env(devices, **extra):
    # Fewer XLA optimisations: the programs compile ~30% faster, and every run here uses the same setting
    # (the in-process reference below sets the same jax option).
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)
    for k in ("MEDVLP_COORDINATOR", "MEDVLP_NUM_PROCESSES", "MEDVLP_PROCESS_ID"):
        if k not in extra:
            env.pop(k, None)
    return env


def _start_two(cmd, port):
    return [subprocess.Popen(cmd, env=_env(4, MEDVLP_COORDINATOR=f"127.0.0.1:{port}", MEDVLP_NUM_PROCESSES="2",
                                           MEDVLP_PROCESS_ID=str(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    for i, (rc, _, err) in enumerate(outs):
        assert rc == 0, f"process {i} exited with {rc}:\n{err[-4000:]}"
    return outs


def _params(workdir, step=None):
    """The saved state, restored by this (single) process onto its first device, whatever wrote it."""
    import jax
    import orbax.checkpoint as ocp
    ck = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ck) if d.isdigit()) if step is None else step
    path = os.path.join(ck, str(step), "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    return step, ocp.StandardCheckpointer().restore(path, target)


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_state(ref, got, rtol=1e-5, atol=1e-6):
    """Params and Adam moments agree to float rounding, except attention *key* biases: softmax over keys is
    invariant to a per-query constant, so q.b_k cancels and their gradient is pure rounding noise (~1e-9),
    which Adam's normalisation turns into +-lr steps of arbitrary sign. They are checked to stay within the
    few Adam steps taken instead."""
    import jax
    for name in ("params", "opt_state"):
        a_leaves = jax.tree_util.tree_leaves_with_path(ref[name])
        b_leaves = jax.tree.leaves(got[name])
        assert len(a_leaves) == len(b_leaves)
        for (path, a), b in zip(a_leaves, b_leaves):
            key = jax.tree_util.keystr(path)
            if "['key']['bias']" in key:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2, err_msg=key)
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.prepare_synthetic(root, num_train=32, num_test=8, num_shards=4)
    return root


PROBE = r"""
import logging, os, sys
sys.path.insert(0, {root!r})
from medvlp_jax import app, sharding
app.initialize_distributed()
import jax, numpy as np
mesh = sharding.make_mesh({{"data": -1, "fsdp": 2}})
rows = np.arange(4, dtype=np.float32)[:, None] + 10 * jax.process_index()     # this host's 4 rows
batch = sharding.to_global({{"x": rows}}, mesh)
total = jax.jit(lambda b: b["x"].sum(), out_shardings=sharding.replicated(mesh))(batch)
first = jax.jit(lambda b: b["x"][0, 0], out_shardings=sharding.replicated(mesh))(batch)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total), float(first),
      logging.getLogger("medvlp_jax").level, flush=True)
"""


def test_processes_join_from_the_environment_and_reduce_across_hosts(tmp_path):
    """MEDVLP_* variables -> jax.distributed; host batches form one global batch in process order; only
    process 0 keeps INFO logging."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=helpers.ROOT))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], env=_env(2, MEDVLP_COORDINATOR=f"127.0.0.1:{port}",
                                                                      MEDVLP_NUM_PROCESSES="2",
                                                                      MEDVLP_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = _finish(procs, timeout=180)
    results = sorted(line.split()[1:] for _, out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert len(results) == 2
    # 4 devices in all; the sum covers both hosts' rows; row 0 of the global batch is process 0's first row.
    expected_sum = float(np.arange(4).sum() * 2 + 10 * 4)
    for pid, (p, count, devices, total, first, level) in enumerate(results):
        assert (int(p), int(count), int(devices)) == (pid, 2, 4)
        assert float(total) == expected_sum and float(first) == 0.0
    assert int(results[0][5]) == logging.NOTSET and int(results[1][5]) == logging.WARNING   # quiet process 1


def test_slurm_one_task_per_node_drives_all_gpus():
    from medvlp_jax import app
    assert app.slurm_local_device_ids({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}) == list(range(8))
    assert app.slurm_local_device_ids({"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
                                      ) == [0, 1, 2, 3]
    assert app.slurm_local_device_ids({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}) is None
    assert app.slurm_local_device_ids({"SLURM_NTASKS_PER_NODE": "1"}) is None


def _reference_in_this_process(workdir, root, total):
    """The 1-process, 8-device run of ``_cmd``'s config, trained here (pytest has 8 fake CPU devices)."""
    import jax
    from medvlp_jax.train import loop
    config = helpers.load_config("convirt", "test")
    config.data.root, config.data.tokenizer_dir = root, f"{root}/tokenizer"
    config.train.update(total_steps=total, ckpt_every_steps=3, log_every_steps=2, eval_at_end=False)
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.data.num_streams = 2
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)     # as the subprocesses (_env)
    try:
        loop.run(config, str(workdir))
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def test_two_processes_reach_the_parameters_of_one_process(tmp_path, data_root):
    """Two processes x 4 devices train 2 steps; the same run on 8 devices in this process is the reference:
    same parameters and Adam moments, same logged losses. (The slow test below compares 6 steps across
    checkpoints against a separate 1-process run.)"""
    total = 2
    two = _start_two(_cmd(tmp_path, tmp_path / "two", data_root, total), _free_port())
    try:
        _reference_in_this_process(tmp_path / "one", data_root, total)
    finally:
        (_, _, err0), (_, _, err1) = _finish(two)
    s1, ref = _params(str(tmp_path / "one"))
    s2, got = _params(str(tmp_path / "two"))
    assert s1 == s2 == total
    # This process compiled the reference with its own XLA setup (thread pools), so reductions may round
    # differently from the subprocesses': measured up to ~4e-6 on a parameter after two Adam steps.
    _assert_same_state(ref, got, rtol=1e-4, atol=2e-5)
    losses = [[json.loads(line)["train/loss"] for line in open(tmp_path / w / "metrics.jsonl")]
              for w in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 1
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert "compiled the train step" in err0 and "compiled the train step" not in err1


@pytest.mark.slow
def test_two_processes_reach_the_one_process_parameters(tmp_path, data_root):
    """~2.5 min on the shared 2-core machine (3 processes compile and train): marked slow."""
    total = 6
    one = subprocess.Popen(_cmd(tmp_path, tmp_path / "one", data_root, total), env=_env(8),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = _start_two(_cmd(tmp_path, tmp_path / "two", data_root, total), _free_port())
    (_, _, err0), (_, _, err1) = _finish(two)
    _finish([one])

    # Same final state (params, Adam moments, step) as the single process, restored by a third process.
    s1, ref = _params(str(tmp_path / "one"))
    s2, got = _params(str(tmp_path / "two"))
    assert s1 == s2 == total
    _assert_same_state(ref, got)
    # The batches really were the same: the logged losses agree step by step.
    losses = [[json.loads(line)["train/loss"] for line in open(tmp_path / w / "metrics.jsonl")]
              for w in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == total // 2       # process 0 alone wrote metrics
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)

    # Both checkpoints were committed by the two processes together, each with its own shards.
    for step in (3, 6):
        d = tmp_path / "two" / "checkpoints" / str(step)
        assert (d / "commit_success.txt").exists()
    # Only process 0 logs progress; process 1 prints no INFO lines of ours.
    assert "compiled the train step" in err0 and "compiled the train step" not in err1
    assert "method=convirt" in err0 and "method=convirt" not in err1


@pytest.mark.slow
def test_sigterm_on_one_host_saves_on_both_and_the_rerun_resumes(tmp_path, data_root):
    """SIGTERM reaches process 1 only; both agree on the step (JAX preemption sync), save together, exit 0;
    the 2-process rerun resumes there and ends at the uninterrupted single-process parameters."""
    total = 150
    ref = subprocess.Popen(_cmd(tmp_path, tmp_path / "one", data_root, total, "--config.train.ckpt_every_steps=1000"),
                           env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "two"
    cmd = _cmd(tmp_path, work, data_root, total, "--config.train.ckpt_every_steps=1000")
    procs = _start_two(cmd, _free_port())
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "metrics.jsonl").exists():   # process 0 is in the loop
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and steps[0] < total, steps
    assert all(f"checkpoint saved at step {steps[0]}" in err for _, _, err in outs)
    (_, _, err0), _ = _finish(_start_two(cmd, _free_port()))
    assert f"at step {steps[0]}" in err0 and "resumed" in err0
    ref.wait(timeout=300)
    _, a = _params(str(tmp_path / "one"))
    s, b = _params(str(work))
    assert s == total
    _assert_same_state(a, b)
