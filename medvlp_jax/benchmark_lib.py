"""Measures the compiled train step and the input pipeline: time, throughput, FLOPs, MFU, memory.

    rows = benchmark_lib.run(config, steps=10, warmup=3, data_root=None, scaling={"batch_size": [8, 16]})

What one row holds (``StepResult``):
  lower_s / compile_s   tracing+lowering and XLA compilation of the jitted step (``jit.lower(...).compile()``).
  step_s                median wall time of ``steps`` calls after ``warmup`` calls, each ended by
                        ``block_until_ready`` on the metrics (the state is donated and fed back, as in the loop).
  images_per_s          global batch / step_s.
  flops_per_step        XLA's cost analysis of the compiled step (``compiled.cost_analysis()["flops"]``). For an
                        SPMD program XLA reports one partition, so this is per-device flops x devices: it counts
                        what the hardware executes, including work that replicated parameters repeat on every
                        device (the optimizer update), so it is slightly above the "model FLOPs" of papers.
                        XLA counts a loop body once, whatever its trip count: a step with loops over matmuls
                        (chunked local terms, gradient accumulation) or remat is counted on ``unrolled_config``
                        instead, compiled but never run (``flops_source`` says which); remat's recomputation is
                        thus not counted. A step without such loops (``loops_with_matmuls``) is counted as
                        compiled, with no second compile, even when its config has a ``*_chunk`` it never uses.
  mfu                   achieved flops/s / peak flops/s of all devices (``peak_flops``: a table of bf16 dense
                        peaks for TPU v4/v5e/v5p/v6e and A100/H100/H200; on CPU the rate of a large float32
                        matmul on this host, because fake CPU devices share the same cores, measured right
                        after each row's timed steps so that both see the same load from other programs).
  objective             (``run``, separately) the objective's value + gradient alone on the encoder outputs of one
                        batch (``objective_cost``): FLOPs and median time, and their shares of the whole step.
  peak_memory_bytes     per device: ``device.memory_stats()["peak_bytes_in_use"]`` where the backend has it
                        (GPU, TPU), else XLA's compile-time estimate arguments + outputs + temporaries - aliased
                        (``compiled.memory_analysis()``); ``memory_source`` says which.

The step runs on synthetic in-memory batches (random images and token ids with the pipeline's keys and
shapes), so no data is needed; ``pipeline_throughput`` measures the real tf.data pipeline on a prepared data
root on its own (host batches including tokenisation, no device work).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import statistics
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from medvlp_jax.data.example_batch import example_batch_for
from medvlp_jax.types import LossContext

# Dense bf16 peak FLOP/s per chip (vendor data sheets). TPU device_kind strings: "TPU v4", "TPU v5 lite" (v5e),
# "TPU v5p" / "TPU v5", "TPU v6 lite" (v6e). GPU kinds contain the product name ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS: list[tuple[str, str, float]] = [
    (r"v5 ?lite|v5e", "TPU v5e", 197e12),
    (r"v5p|TPU v5$", "TPU v5p", 459e12),
    (r"v6 ?lite|v6e", "TPU v6e", 918e12),
    (r"TPU v4", "TPU v4", 275e12),
    (r"H200", "H200", 989e12),
    (r"H100.*PCIe", "H100 PCIe", 756e12),
    (r"H100", "H100 SXM", 989e12),
    (r"A100", "A100", 312e12),
]


@dataclasses.dataclass
class StepResult:
    """One benchmarked configuration of the train step (see module docstring for each field)."""
    label: str
    batch_size: int
    text_len: int
    image_size: int
    num_devices: int
    lower_s: float
    compile_s: float
    step_s: float
    step_s_all: list[float]
    images_per_s: float
    flops_per_step: Optional[float]
    achieved_flops_per_s: Optional[float]
    mfu: Optional[float]
    peak_memory_bytes: Optional[float]
    memory_source: str
    peak_flops_per_s: Optional[float] = None
    load_average_1m: Optional[float] = None     # of the host, after the row (other programs skew CPU timings)
    flops_source: str = "compiled step"         # or the unrolled_config changes the FLOPs were counted with


def peak_flops(device: jax.Device, *, cpu_matmul_size: int = 2048) -> tuple[float, str]:
    """Peak FLOP/s of one device (accelerators: table; CPU: measured matmul rate of the whole host).

    Returns:
      (flop/s, a description of where the number comes from).
    """
    if device.platform == "cpu":
        return measure_cpu_matmul_flops(cpu_matmul_size), f"measured f32 matmul {cpu_matmul_size}^3 on this host"
    kind = device.device_kind
    for pattern, name, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, kind):
            return flops, f"{name} bf16 dense peak"
    return float("nan"), f"unknown device kind {kind!r} (no peak in the table)"


def measure_cpu_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an [n, n] @ [n, n] float32 matmul on the first device (median of ``repeats``)."""
    dev = jax.devices()[0]
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times)


def with_shape(config, *, batch_size: Optional[int] = None, text_len: Optional[int] = None,
               image_size: Optional[int] = None):
    """A copy of ``config`` with the global batch, text length or image (crop) size changed consistently."""
    c = config.copy_and_resolve_references()
    if batch_size is not None:
        c.train.batch_size = int(batch_size)
    if text_len is not None:
        c.data.max_text_len = int(text_len)
        if c.model.text.get("max_position", 0) < text_len:
            c.model.text.max_position = int(text_len)
    if image_size is not None:
        c.data.crop = int(image_size)
        c.data.resize = max(int(c.data.resize), int(image_size))
        c.model.image.image_size = int(image_size)
    return c


def _check(config, num_devices: int) -> None:
    bs, accum = config.train.batch_size, config.optim.grad_accum_steps
    if bs % num_devices or (bs // accum) % num_devices:
        raise ValueError(f"batch size {bs} (grad_accum_steps {accum}) does not split over {num_devices} devices")
    patch = config.model.image.get("patch_size")
    if config.model.image.name == "vit" and config.data.crop % patch:
        raise ValueError(f"image size {config.data.crop} is not a multiple of the patch size {patch}")


def build_step(config, devices: Sequence[jax.Device]):
    """The train state (initialised on the mesh) and the jitted train step, exactly as the loop builds them.

    Returns:
      (state, jitted step, mesh).
    """
    b = _build(config, devices)
    return b["state"], b["step"], b["mesh"]


def _build(config, devices: Sequence[jax.Device], materialize: bool = True) -> dict[str, Any]:
    """build_step's pieces: model, objective, state, jitted step, mesh (``materialize=False``: the state as
    ShapeDtypeStructs carrying their shardings, enough to lower and compile the step)."""
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.train.setup import build
    setup = build(config, sharding_lib.make_mesh(config.mesh, devices), steps_per_epoch=1000, total_steps=10_000)
    state = setup.init_state() if materialize else setup.abstract_sharded()
    return {"model": setup.model, "objective": setup.objective, "state": state, "step": setup.jit_train_step(),
            "mesh": setup.mesh}


def unrolled_config(config):
    """The config whose step computes the same model FLOPs without loops: ``method.*_chunk`` = None (the
    cross-sample local terms in one block), no encoder remat, no gradient accumulation. XLA's cost analysis
    counts the body of a loop (``lax.map``, ``lax.scan``) once, whatever its trip count, so the FLOPs of a
    chunked or accumulated step are read from this variant (compiled, never run). Returns (config, changed)."""
    c = config.copy_and_resolve_references()
    changed = []
    for k in list(c.method.keys()):
        if k.endswith("_chunk") and c.method[k] is not None:
            c.method[k] = None
            changed.append(f"method.{k}=None")
    if c.model.get("remat", False):
        c.model.remat = False
        changed.append("model.remat=False")
    if c.optim.get("grad_accum_steps", 1) != 1:
        c.optim.grad_accum_steps = 1
        changed.append("optim.grad_accum_steps=1")
    return c, changed


LOOP_PRIMITIVES = ("scan", "while")
MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")


def loops_with_matmuls(jaxpr) -> int:
    """How many loops (``scan``/``while`` equations, at any depth) of ``jaxpr`` hold a matmul or convolution.

    Those are the loops whose FLOPs XLA's cost analysis counts once instead of once per trip. Loops without
    one (Sinkhorn's fori_loop, say) carry negligible FLOPs: a step with none needs no loop-free variant.
    """
    from jax.extend.core import jaxprs_in_params
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)

    def has_matmul(j) -> bool:
        j = getattr(j, "jaxpr", j)
        return any(e.primitive.name in MATMUL_PRIMITIVES or any(has_matmul(s) for s in jaxprs_in_params(e.params))
                   for e in j.eqns)

    count = 0
    for e in jaxpr.eqns:
        subs = list(jaxprs_in_params(e.params))
        if e.primitive.name in LOOP_PRIMITIVES and any(has_matmul(s) for s in subs):
            count += 1
        else:
            count += sum(loops_with_matmuls(s) for s in subs)
    return count


def flop_count_variant(config, jaxpr) -> tuple[Any, list[str]]:
    """The config to count the step's FLOPs on: ``unrolled_config(config)`` when the traced step (``jaxpr``) has
    a loop over matmuls or the encoders are rematerialised; else ``(config, [])``: the compiled step's own count
    is whole, and no second compile is needed (e.g. MGCA's pair-wise local terms never use ``local_chunk``)."""
    unrolled, changed = unrolled_config(config)
    if changed and not config.model.get("remat", False) and not loops_with_matmuls(jaxpr):
        return config, []
    return unrolled, changed


def model_flops(config, devices: Sequence[jax.Device]) -> Optional[float]:
    """FLOPs of one train step (all devices) from XLA's cost analysis of the compiled ``unrolled_config`` step."""
    from medvlp_jax import sharding as sharding_lib
    b = _build(config, devices, materialize=False)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(b["mesh"]))
             for k, v in example_batch_for(config, config.train.batch_size, seed=0).items()}
    per_device = _cost_flops(b["step"].lower(b["state"], batch).compile())
    return None if per_device is None else per_device * len(devices)


def objective_cost(config, *, devices: Optional[Sequence[jax.Device]] = None, steps: int = 5, warmup: int = 2,
                   at_step: int = 10**6) -> dict[str, Any]:
    """FLOPs and time of the objective alone: its value and gradient with respect to the encoder outputs and
    the method's own parameters, on the encoder outputs of one synthetic batch, jitted on the same mesh.

    Set beside the whole step's FLOPs this says how much of the step the alignment objective costs (the rest is
    the encoders' forward and backward and the optimizer). ``at_step`` is the schedule step fed to the loss
    (late: every scheduled term on); schedules are ``jnp.where`` switches, so every term is compiled anyway.

    Returns:
      {"flops": per step (all devices) or None, "step_s": median seconds, "compile_s": seconds}.
    """
    import jax.numpy as jnp
    from medvlp_jax import sharding as sharding_lib
    devices = list(devices if devices is not None else jax.devices())
    b = _build(config, devices)
    model, objective, state, mesh = b["model"], b["objective"], b["state"], b["mesh"]
    batch = sharding_lib.to_global(example_batch_for(config, config.train.batch_size, seed=0), mesh)
    variables = {"params": state.params["encoders"], **state.model_state}
    # Eager apply: static fields of the outputs (the patch grid) stay Python values, as inside the train step.
    out = model.apply(variables, batch, train=False)
    leaves, treedef = jax.tree.flatten(out)
    kinds = ["diff" if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
             else "array" if isinstance(x, jax.Array) else "static" for x in leaves]
    diff = [x for x, k in zip(leaves, kinds) if k == "diff"]
    arrays = [x for x, k in zip(leaves, kinds) if k == "array"]

    def assemble(d, a):
        d, a = iter(d), iter(a)
        return treedef.unflatten([next(d) if k == "diff" else next(a) if k == "array" else x
                                  for x, k in zip(leaves, kinds)])

    def compile_for(obj):
        def loss_fn(method_params, d, a, batch, step):
            o = assemble(d, a)
            teacher = jax.tree.map(jax.lax.stop_gradient, o) if obj.ema_decay is not None else None
            loss, _ = obj.loss(method_params, o, batch, LossContext(step, jax.random.PRNGKey(0), teacher))
            return loss
        traced = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).trace(*args)
        return traced.lower().compile(), traced.jaxpr

    method_params = objective.prepare_params(state.params["method"])
    args = (method_params, diff, arrays, batch, jnp.asarray(at_step, jnp.int32))
    t0 = time.perf_counter()
    compiled, jaxpr = compile_for(objective)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    unrolled, changed = unrolled_config(config)
    if changed and loops_with_matmuls(jaxpr):   # a chunked objective: XLA counts one chunk; count the one-block form
        from medvlp_jax.methods import make_objective
        compiled, _ = compile_for(make_objective(unrolled.method, steps_per_epoch=1000))
    per_device = _cost_flops(compiled)
    return {"flops": None if per_device is None else per_device * len(devices),
            "step_s": statistics.median(times), "compile_s": compile_s}


def _cost_flops(compiled) -> Optional[float]:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):          # older jax: one dict per program
        ca = ca[0] if ca else {}
    flops = (ca or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _memory(compiled, devices) -> tuple[Optional[float], str]:
    stats = [d.memory_stats() for d in devices]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return float(max(s["peak_bytes_in_use"] for s in stats)), "device.memory_stats peak_bytes_in_use"
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None, "unavailable"
    if m is None:
        return None, "unavailable"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return float(total), "compiled.memory_analysis (args + outputs + temps - aliased)"


def time_step(config, *, devices: Optional[Sequence[jax.Device]] = None, steps: int = 10, warmup: int = 3,
              peak: Optional[float] = None, label: str = "", at_step: int = 10**6) -> StepResult:
    """Compiles and times the train step of ``config`` on synthetic batches (see module docstring).

    The state's step counter starts at ``at_step`` (late: every scheduled term on, e.g. PLAN's stage 3, which
    its earlier stages skip with ``lax.cond``), so the time is that of the full objective.
    """
    from medvlp_jax import sharding as sharding_lib
    devices = list(devices if devices is not None else jax.devices())
    _check(config, len(devices))
    state, step, mesh = build_step(config, devices)
    state = dataclasses.replace(state, step=jax.device_put(np.asarray(at_step, np.asarray(state.step).dtype),
                                                           state.step.sharding))
    batch = sharding_lib.to_global(example_batch_for(config, config.train.batch_size, seed=0), mesh)
    t0 = time.perf_counter()
    traced = step.trace(state, batch)
    lowered = traced.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    unrolled, changed = flop_count_variant(config, traced.jaxpr)
    if changed:                 # loops over matmuls in the step: count the FLOPs on the loop-free variant
        flops = model_flops(unrolled, devices)
        flops_source = "loop-free variant: " + ", ".join(changed)
    else:
        per_device = _cost_flops(compiled)
        flops = per_device * len(devices) if per_device is not None else None
        flops_source = "compiled step"
    achieved = flops / step_s if flops is not None else None
    if peak is None:                            # CPU: measured now, under the load the steps just saw
        peak, _ = peak_flops(devices[0])
        if devices[0].platform != "cpu":
            peak *= len(devices)
    mfu = achieved / peak if achieved is not None and peak and np.isfinite(peak) else None
    mem, source = _memory(compiled, devices)
    del state
    return StepResult(label=label, batch_size=int(config.train.batch_size), text_len=int(config.data.max_text_len),
                      image_size=int(config.data.crop), num_devices=len(devices), lower_s=t1 - t0,
                      compile_s=t2 - t1, step_s=step_s, step_s_all=times,
                      images_per_s=config.train.batch_size / step_s, flops_per_step=flops,
                      achieved_flops_per_s=achieved, mfu=mfu, peak_memory_bytes=mem, memory_source=source,
                      peak_flops_per_s=peak, load_average_1m=os.getloadavg()[0], flops_source=flops_source)


def pipeline_throughput(config, *, batches: int = 20, warmup: int = 3) -> dict[str, float]:
    """Examples/s of the tf.data training pipeline alone (decode, augment, batch, tokenise) on this host.

    Also the process CPU seconds the timed batches took: ``examples_per_cpu_s`` is the rate per busy core, which
    other programs on the host do not change much (wall-clock examples/s they do), so
    ``target / examples_per_cpu_s`` estimates the cores a host needs for ``target`` examples/s.
    """
    from medvlp_jax.data import pipeline, tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(config.data.tokenizer_dir)
    it = pipeline.make_train_iter(config, tok, start_step=0)
    for _ in range(warmup):
        next(it)
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    n = batches * config.train.batch_size
    return {"examples_per_s": n / dt, "batches": batches, "batch_size": int(config.train.batch_size), "seconds": dt,
            "cpu_seconds": cpu, "examples_per_cpu_s": n / cpu if cpu > 0 else None}


def default_scaling(config, num_devices: int) -> dict[str, list[int]]:
    """Half and double the batch, half the text length, a smaller image: one axis at a time."""
    b, t, c = config.train.batch_size, config.data.max_text_len, config.data.crop
    patch = config.model.image.get("patch_size") or 8
    smaller = max(patch, (c // 2 + patch - 1) // patch * patch)
    batches = sorted({x for x in (b // 2, b, 2 * b) if x >= num_devices and x % num_devices == 0})
    return {"batch_size": batches, "text_len": sorted({max(8, t // 2), t}), "image_size": sorted({smaller, c})}


def run(config, *, steps: int = 10, warmup: int = 3, scaling: Optional[dict[str, list[int]]] = None,
        scaling_steps: int = 3, data_root: Optional[str] = None, pipeline_batches: int = 20,
        devices: Optional[Sequence[jax.Device]] = None, objective: bool = True, log=print) -> dict[str, Any]:
    """The whole benchmark: base step, the objective alone, scaling rows (one axis varied at a time), input pipeline.

    Returns:
      a JSON-serialisable dict: environment, peak, base row, objective cost (or None; ``objective_cost`` plus
      ``share_of_step_flops`` and ``share_of_step_time``), scaling rows, pipeline throughput (or None).
    """
    devices = list(devices if devices is not None else jax.devices())
    load_start = os.getloadavg()[0]              # other work on the host skews CPU timings: recorded with them
    peak_one, peak_source = peak_flops(devices[0])
    on_cpu = devices[0].platform == "cpu"
    peak_all = peak_one if on_cpu else peak_one * len(devices)
    if on_cpu:
        peak_source += ", re-measured after each row's steps"
    log(f"peak: {peak_all / 1e12:.3f} TFLOP/s ({peak_source}; {len(devices)} x {devices[0].device_kind})")
    row_peak = None if on_cpu else peak_all
    base = time_step(config, devices=devices, steps=steps, warmup=warmup, peak=row_peak, label="base")
    log(format_row(base))
    obj = None
    if objective:
        obj = objective_cost(config, devices=devices, steps=steps, warmup=warmup)
        known = obj["flops"] and base.flops_per_step
        obj["share_of_step_flops"] = obj["flops"] / base.flops_per_step if known else None
        obj["share_of_step_time"] = obj["step_s"] / base.step_s
        log(format_objective(obj))
    rows = []
    for axis, values in (scaling or {}).items():
        for v in values:
            if axis == "batch_size" and v == base.batch_size or axis == "text_len" and v == base.text_len or \
                    axis == "image_size" and v == base.image_size:
                continue
            cfg = with_shape(config, **{axis: v})
            try:
                r = time_step(cfg, devices=devices, steps=scaling_steps, warmup=1, peak=row_peak,
                              label=f"{axis}={v}")
            except Exception as e:  # e.g. out of memory at the largest size: report, keep going
                log(f"{axis}={v}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            log(format_row(r))
            rows.append(r)
    pipe = None
    if data_root:
        cfg = config.copy_and_resolve_references()
        cfg.data.root = data_root
        if not os.path.isdir(cfg.data.tokenizer_dir) and os.path.isdir(os.path.join(data_root, "tokenizer")):
            cfg.data.tokenizer_dir = os.path.join(data_root, "tokenizer")
        pipe = pipeline_throughput(cfg, batches=pipeline_batches)
        per_core = pipe["examples_per_cpu_s"]
        log(f"input pipeline: {pipe['examples_per_s']:.1f} examples/s (batch {pipe['batch_size']}), "
            f"{per_core or float('nan'):.0f} examples per CPU-second")
    return {
        "environment": dict(environment(devices), load_average_start=load_start),
        "peak_flops_per_s": peak_all, "peak_source": peak_source,
        "model": {"image": dict(config.model.image), "text": dict(config.model.text), "dtype": config.model.dtype,
                  "remat": bool(config.model.get("remat", False)), "method": config.method.name},
        "base": dataclasses.asdict(base), "objective": obj, "scaling": [dataclasses.asdict(r) for r in rows],
        "pipeline": pipe,
    }


def format_objective(obj: dict[str, Any]) -> str:
    """One line: the objective's value + gradient alone, FLOPs and time, and their shares of the whole step."""
    flops = "n/a" if obj["flops"] is None else f"{obj['flops'] / 1e9:.4g} GFLOP"
    share = "n/a" if obj.get("share_of_step_flops") is None else f"{100 * obj['share_of_step_flops']:.2f}%"
    return (f"Objective alone (value + gradient w.r.t. encoder outputs and method params): {flops}/step "
            f"({share} of the step's FLOPs), {obj['step_s'] * 1e3:.2f} ms "
            f"({100 * obj['share_of_step_time']:.1f}% of the step time).")


def environment(devices: Sequence[jax.Device]) -> dict[str, Any]:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
            # compile_s of a step the persistent cache holds is its load time (MEDVLP_COMPILATION_CACHE=off: cold)
            "compilation_cache": jax.config.jax_compilation_cache_dir
            if jax.config.jax_enable_compilation_cache else None,
            "platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
            "host": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_average_1m": os.getloadavg()[0]}


def _fmt(x: Optional[float], scale: float = 1.0, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x / scale:.{digits}g}"


def format_row(r: StepResult) -> str:
    return (f"{r.label}: batch {r.batch_size} text {r.text_len} image {r.image_size}: compile {r.compile_s:.1f}s, "
            f"step {r.step_s * 1e3:.1f} ms, {r.images_per_s:.1f} img/s, {_fmt(r.flops_per_step, 1e9)} GFLOP/step, "
            f"MFU {_fmt(r.mfu and 100 * r.mfu)}% of {_fmt(r.peak_flops_per_s, 1e12)} TFLOP/s, "
            f"memory {_fmt(r.peak_memory_bytes, 2 ** 20)} MiB")


def markdown(result: dict[str, Any], title: str = "") -> str:
    """The benchmark as Markdown: one table of step rows, then the pipeline line and the environment."""
    env = result["environment"]
    head = ("| run | batch | text len | image | compile s | step ms (median) | images/s | GFLOP/step | "
            "TFLOP/s | peak TFLOP/s | MFU % | peak mem/device MiB | host load |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"### {title}" if title else "", "", head]
    for r in [result["base"]] + result["scaling"]:
        lines.append(f"| {r['label']} | {r['batch_size']} | {r['text_len']} | {r['image_size']} | "
                     f"{r['compile_s']:.1f} | {r['step_s'] * 1e3:.1f} | {r['images_per_s']:.2f} | "
                     f"{_fmt(r['flops_per_step'], 1e9, 4)} | {_fmt(r['achieved_flops_per_s'], 1e12)} | "
                     f"{_fmt(r.get('peak_flops_per_s'), 1e12)} | "
                     f"{_fmt(r['mfu'] and 100 * r['mfu'])} | {_fmt(r['peak_memory_bytes'], 2 ** 20, 4)} | "
                     f"{_fmt(r.get('load_average_1m'), 1, 2)} |")
    lines.append("")
    if result.get("objective"):
        lines.append(format_objective(result["objective"]))
    if result.get("pipeline"):
        p = result["pipeline"]
        per_core = p.get("examples_per_cpu_s")
        lines.append(f"Input pipeline alone: **{p['examples_per_s']:.0f} examples/s** "
                     f"(batch {p['batch_size']}, {p['batches']} batches)"
                     + (f", {per_core:.0f} examples per CPU-second." if per_core else "."))
    load = f"load average {env.get('load_average_start', float('nan')):.1f} at the start, " \
           f"{env['load_average_1m']:.1f} at the end"
    lines.append(f"Peak for MFU: {result['peak_source']}. "
                 f"Memory: {result['base']['memory_source']}. Devices: {env['num_devices']} x {env['device_kind']} "
                 f"({env['platform']}), jax {env['jax']}, {env['cpu_count']} CPUs ({load}), {env['date']}. "
                 f"Compilation cache: {env.get('compilation_cache') or 'off'} (compile s of a cached step is its "
                 "load time).")
    return "\n".join(lines) + "\n"


def write_json(result: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
