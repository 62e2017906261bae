"""Profile the compiled train step of a config on this machine: where each millisecond goes, by category.

  python benchmarks/profile_step.py --config=configs/mgca.py --config.train.batch_size=8 \
      --config.optim.clip_norm=0 --steps=2 --out=runs/profile/mgca_paper_b8
  XLA_FLAGS=... python benchmarks/profile_step.py ...      # the same under other XLA:CPU options

Builds the step exactly as launch/benchmark.py does (``benchmark_lib.build_step``: the launcher's model,
objective, optimizer, shardings, donation), compiles it, runs ``--warmup`` steps, then ``--steps`` steps under
``jax.profiler.trace`` and attributes every thunk of the trace to a category (``benchmarks/hlo_profile.py``).
Writes ``<out>/profile.json`` (categories, slowest instructions, wall times), ``<out>/profile.md`` (the table)
and ``<out>/step.hlo`` (the optimized HLO the table was read from). Prints the table.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 2, "profiled steps")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps after compilation")
_OUT = flags.DEFINE_string("out", None, "output directory (default runs/profile/<method>_<variant>)")
flags.mark_flags_as_required(["config"])


def profile(config, *, steps: int, warmup: int, out_dir: str, log=print) -> dict:
    """Compiles, warms up and traces ``steps`` steps of ``config``'s train step; returns the profile dict."""
    import dataclasses
    import json
    import resource
    import shutil
    import statistics
    import time

    import jax
    import numpy as np
    from benchmarks import hlo_profile
    from medvlp_jax import benchmark_lib, sharding as sharding_lib
    from medvlp_jax.data.example_batch import example_batch_for

    devices = jax.devices()[:1]
    state, step, mesh = benchmark_lib.build_step(config, devices)
    # Late step counter: every scheduled term of the objective is on (as benchmark_lib.time_step).
    state = dataclasses.replace(state, step=jax.device_put(np.asarray(10**6, np.asarray(state.step).dtype),
                                                           state.step.sharding))
    batch = sharding_lib.to_global(example_batch_for(config, config.train.batch_size, seed=0), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    log(f"compiled in {compile_s:.1f} s")
    hlo = compiled.as_text()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step.hlo"), "w") as f:
        f.write(hlo)

    def run(n):
        times, cpu = [], []
        nonlocal state
        for _ in range(n):
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            times.append(time.perf_counter() - t)
            cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        return times, cpu

    run(warmup)
    trace_dir = os.path.join(out_dir, "trace")
    shutil.rmtree(trace_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        times, cpu = run(steps)
    module = hlo_profile.parse_hlo(hlo)
    table = hlo_profile.profile_table(module, hlo_profile.load_trace_events(trace_dir), steps=steps,
                                      source_root=ROOT)
    result = {"config": {"method": config.method.name, "batch_size": int(config.train.batch_size),
                         "image": int(config.data.crop), "text_len": int(config.data.max_text_len),
                         "dtype": config.model.dtype, "prng_impl": config.train.get("prng_impl", "threefry2x32")},
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "compile_s": compile_s,
              "step_s_all": times, "step_s": statistics.median(times), "cpu_s_all": cpu,
              "cpu_s": statistics.median(cpu), "load_average": [load_before, os.getloadavg()[0]],
              "gflop_per_step": (benchmark_lib._cost_flops(compiled) or float("nan")) / 1e9, **table}
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    md = hlo_profile.markdown_table(table)
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write(md)
    log(md)
    log(f"wall {result['step_s']:.2f} s/step (median of {steps}), process CPU {result['cpu_s']:.2f} s/step, "
        f"XLA {result['gflop_per_step']:.0f} GFLOP/step, load {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    log("slowest instructions:")
    for r in table["top"][:12]:
        log(f"  {r['ms']:8.1f} ms  {r['category']:<45} {r['name']}  {r['op_name'][-90:]}")
    return result


def main(argv):
    del argv
    from medvlp_jax import app as app_lib

    def body():
        config = _CONFIG.value
        out = _OUT.value or os.path.join("runs", "profile", f"{config.method.name}_{config.get('variant', '')}")
        profile(config, steps=_STEPS.value, warmup=_WARMUP.value, out_dir=out)

    app_lib.run_main(body)


if __name__ == "__main__":
    from medvlp_jax.app import parse_flags
    app.run(main, flags_parser=parse_flags)
