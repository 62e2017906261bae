"""run(config, workdir): init or resume -> train loop -> checkpoints -> end-of-run evaluation.

The end-of-run evaluation is passed in by the caller (``end_of_run_eval``; launch/pretrain.py passes
``evaluators.quick.evaluate_state``), so training never imports an evaluator.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from medvlp_jax import config_lib, logging_lib, sharding as sharding_lib
from medvlp_jax.data import host_batches, pipeline, prepare, schema, tokenizer as tokenizer_lib
from medvlp_jax.errors import Preempted  # noqa: F401  (re-exported; defined in the bottom layer)
from medvlp_jax.logging_lib import log
from medvlp_jax.train import checkpoint as ckpt_lib, faults
from medvlp_jax.train.setup import Setup, build


def total_steps_of(config, num_train: int) -> int:
    if config.train.total_steps and config.train.total_steps > 0:
        return int(config.train.total_steps)
    return int(config.train.epochs) * config_lib.steps_per_epoch(config, num_train)


def setup(config, *, devices=None) -> Setup:
    """Validates the config, prepares the demo data if it is the source, and builds the run on ``devices``
    (default: all) with schedules sized by the data's train split."""
    devices = list(devices if devices is not None else jax.devices())
    config_lib.validate(config, num_devices=len(devices))      # before any data is rendered or read
    prepare.ensure_demo_data(config)
    info = schema.read_info(config.data.root)
    num_train = info["splits"][config.data.train_split]["num_examples"]
    return build(config, sharding_lib.make_mesh(config.mesh, devices),
                 steps_per_epoch=config_lib.steps_per_epoch(config, num_train),
                 total_steps=total_steps_of(config, num_train))


def load_pretrained_towers(config, state, shardings):
    """Replaces the text/image towers by the Hugging Face / torchvision checkpoints the config names.

    Every process reads the checkpoint and places its shards (works multi-host). Returns the new state.
    """
    from jax.experimental import multihost_utils
    from medvlp_jax.models import hf_import
    text_ckpt = config.model.text.get("hf_checkpoint", "")
    image_ckpt = config.model.image.get("hf_checkpoint", "")
    if not text_ckpt and not image_ckpt:
        return state
    host = multihost_utils.process_allgather({"params": state.params["encoders"], **state.model_state}, tiled=True)
    if text_ckpt:
        host, report = hf_import.load_text_tower(host, config.model)
        log.info("text tower from %s: %s", text_ckpt, report.summary())
    if image_ckpt:
        host, report = hf_import.load_image_tower(host, config.model)
        log.info("image tower from %s: %s", image_ckpt, report.summary())
    enc = host.pop("params")
    new = state.replace(params=dict(state.params, encoders=enc), model_state=host,
                        ema_params=enc if state.ema_params is not None else None)

    def place(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    placed = jax.tree.map(place, (new.params, new.model_state, new.ema_params),
                          (shardings.params, shardings.model_state, shardings.ema_params))
    return state.replace(params=placed[0], model_state=placed[1], ema_params=placed[2])


@jax.jit
def _add_metrics(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Element-wise sum of two metric dicts (scalars; replicated over the mesh)."""
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _warn_checks(objective, step: int, metrics: dict[str, float], warned: set[str], *, enabled: bool = True) -> None:
    """Logs the first warning of each of the objective's ``check_metrics`` checks (methods/__init__.py)."""
    if objective.check_metrics is None or not enabled:
        return
    for name, message in objective.check_metrics(metrics).items():
        if name not in warned:
            warned.add(name)
            log.warning("step %d: %s (warned once per run)", step, message)


def _count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def check_resume_config(config, workdir: str, *, allow_change: bool = False) -> None:
    """Stops a resume whose config changes the run (``config_lib.resume_config_changes``) with one line.

    With ``allow_change`` the differing fields are logged and the workdir's old ``config.json`` is kept beside
    the new one as ``config.before-<unix time>.json``. Call only when the workdir holds a checkpoint.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    changed = config_lib.resume_config_changes(old, json.loads(config.to_json_best_effort()))
    if not changed:
        return
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    if not allow_change:
        raise config_lib.ConfigError(
            f"--workdir={workdir} holds a run whose config.json differs in {shown}; resuming would change the "
            f"run midway. Use the same config to resume, another --workdir for a new run, or "
            f"--allow_config_change to resume with the new config deliberately")
    log.warning("resuming %s with a changed config (--allow_config_change): %s; the old config is kept in %s",
                workdir, shown, "config.before-*.json")
    if jax.process_index() == 0:
        os.replace(path, os.path.join(workdir, f"config.before-{int(time.time())}.json"))


# (config, Setup, final TrainState, tokenizer) -> {metric name: value}
EndOfRunEval = Callable[[Any, Setup, Any, Any], dict]


def run(config, workdir: str, *, end_of_run_eval: EndOfRunEval | None = None, stop_after_steps: int | None = None,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds checkpoints); returns the final metrics.

    end_of_run_eval: called on the final state when ``config.train.eval_at_end``; its metrics go to
        ``<workdir>/eval_results.json`` and ``results["eval"]`` (launch/pretrain.py passes
        ``medvlp_jax.evaluators.quick.evaluate_state``). None: no end-of-run evaluation.

    stop_after_steps: stop early (as if killed) after this many steps of this invocation (tests).
    allow_config_change: resume even though the config differs from the workdir's (``check_resume_config``).
    """
    logging_lib.setup_logging()
    is_main = jax.process_index() == 0
    config_lib.check_output_dir(workdir, "--workdir")
    if ckpt_lib.has_checkpoints(workdir):
        check_resume_config(config, workdir, allow_change=allow_config_change)
    s = setup(config)
    mesh, total = s.mesh, s.total_steps
    ckpt = ckpt_lib.Checkpointer(workdir, every_steps=config.train.ckpt_every_steps, keep=config.train.keep_ckpts)
    found = ckpt.restore_latest(s.abstract, s.shardings)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    if found is not None:
        state, position, start = found
        log.info("resumed from %s at step %d (examples seen %s)", ckpt.directory, start,
                 position.get("examples_seen"))
        if position.get("seed") != config.seed:
            raise config_lib.ConfigError(
                f"checkpoint in {workdir} was written with seed {position.get('seed')} but config.seed="
                f"{config.seed}; use a fresh --workdir or the same seed")
    else:
        start = 0
        state = s.init_state()
        state = load_pretrained_towers(config, state, s.shardings)
    log.info("method=%s  params: encoders %.2fM, method %d  mesh %s  steps %d (%d/epoch)  global batch %d",
             config.method.name, _count_params(state.params["encoders"]) / 1e6, _count_params(state.params["method"]),
             dict(mesh.shape), total, s.steps_per_epoch, config.train.batch_size)

    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer_dir)
    host_iter = pipeline.make_train_iter(config, tokenizer, start_step=start, process_index=jax.process_index(),
                                         process_count=jax.process_count())
    batches = host_batches.Prefetcher(host_iter, lambda b: sharding_lib.to_global(b, mesh),
                                      depth=config.data.get("prefetch", 2))
    train_step = s.jit_train_step()

    writer = logging_lib.MetricWriter(workdir, enabled=is_main, resume_step=start)
    preemption = faults.PreemptionWatch()      # SIGTERM/Ctrl-C -> save + exit at a step all processes agree on
    nonfinite = faults.NonfiniteMonitor(config.train.nonfinite, split=config.data.train_split)

    def position(step):
        return {"step": int(step), "seed": int(config.seed), "examples_seen": int(step) * config.train.batch_size}

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not is_main, desc=config.method.name, dynamic_ncols=True)
    last_metrics: dict[str, float] = {}
    warned_checks: set[str] = set()
    t_log, steps_since_log = time.time(), 0
    metric_sum = None
    step = start
    try:
        for step in range(start + 1, total + 1):
            batch = next(batches)
            if step == start + 1:
                t0 = time.time()
                compiled = train_step.lower(state, batch).compile()
                log.info("compiled the train step in %.1fs", time.time() - t0)
                train_step = compiled
            state, metrics = train_step(state, batch)
            nonfinite.record(step, metrics, batch)
            # Logged metrics are means over the log interval, summed on the device (no host sync per step).
            metric_sum = metrics if metric_sum is None else _add_metrics(metric_sum, metrics)
            bar.update(1)
            steps_since_log += 1
            if step % config.train.log_every_steps == 0 or step == total:
                nonfinite.check(step)           # "stop": raises naming every non-finite step since the last log
                m = {k: v / steps_since_log for k, v in jax.device_get(metric_sum).items()}
                metric_sum = None
                dt = time.time() - t_log
                rates = {"perf/steps_per_s": steps_since_log / dt,
                         "perf/images_per_s": steps_since_log * config.train.batch_size / dt,
                         "train/nonfinite_steps": int(jax.device_get(state.nonfinite_steps))}
                if config.data.get("skip_bad_records", False):   # summed over hosts; a few batches ahead
                    rates["data/skipped_records"] = host_batches.global_count(host_iter.num_skipped)
                last_metrics = {k: float(v) for k, v in m.items()} | rates
                writer.write_scalars(step, last_metrics)
                _warn_checks(s.objective, step, last_metrics, warned_checks, enabled=is_main)
                bar.set_postfix(loss=f"{last_metrics['train/loss']:.3f}")
                t_log, steps_since_log = time.time(), 0
            ckpt.save(step, state, position(step))
            if preemption.reached(step):
                ckpt.save(step, state, position(step), force=True)
                ckpt.wait()
                name = preemption.signal_name or "SIGTERM"
                log.info("%s: saved a checkpoint at step %d; exiting", name, step)
                raise Preempted(step, name)
            if stop_after_steps is not None and step - start >= stop_after_steps:
                ckpt.wait()
                return {"stopped_at": step}
        ckpt.save(step, state, position(step), force=True)
        ckpt.wait()
    finally:
        bar.close()
        batches.close()
        writer.close()
        ckpt.close()
        preemption.close()

    results: dict[str, Any] = {"train": last_metrics, "steps": step}
    if config.train.get("eval_at_end", True) and end_of_run_eval is None:
        log.info("no end-of-run evaluation: run() was given no end_of_run_eval (launch/pretrain.py passes "
                 "medvlp_jax.evaluators.quick.evaluate_state)")
    elif config.train.get("eval_at_end", True):
        results["eval"] = end_of_run_eval(config, s, state, tokenizer)
        if is_main:
            with open(os.path.join(workdir, "eval_results.json"), "w") as f:
                json.dump(results["eval"], f, indent=1)
            log.info("end-of-run evaluation on split %r: %s", config.data.eval_split,
                     "  ".join(f"{k}={v:.4g}" for k, v in results["eval"].items() if isinstance(v, float)))
    return results
