"""Our JAX train step next to an equivalent PyTorch step on the same machine: both step times and their ratio.

  python benchmarks/compare_torch.py --config=configs/mgca.py --config.train.batch_size=8 \
      --config.optim.clip_norm=0 --steps=3 --warmup=1 --alternations=3
  python benchmarks/compare_torch.py --config=configs/mgca.py:test --steps=2 --warmup=1 --alternations=1

The PyTorch row is OUR OWN STAND-IN for the authors' code, not their code (``benchmarks/torch_mgca.py``):
transformers' PyTorch ``ViTModel`` and ``BertModel`` with the config's sizes and dropouts, MGCA's heads, a
port of our MGCA objective, torch.optim.AdamW, gradient clipping off. Compare with
``--config.optim.clip_norm=0`` (the PyTorch step does not clip). The JAX row is the launcher's step
(``benchmark_lib.build_step``: same model, objective, optimizer, shardings, donation), on one device.

Both run in this process on the same synthetic batch (``benchmark_lib.synthetic_batch``), alternately
(``--alternations`` rounds of ``--steps`` JAX steps then ``--steps`` PyTorch steps), so both see the same load
from other programs; the medians over all timed steps are compared. PyTorch uses ``--threads`` intra-op threads
(default: every CPU, as XLA:CPU does). Prints a Markdown table, writes JSON (``--out``).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/mgca.py[:variant]", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per side per alternation")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps per side before the first alternation")
_ALTERNATIONS = flags.DEFINE_integer("alternations", 3, "rounds of (JAX steps, PyTorch steps)")
_THREADS = flags.DEFINE_integer("threads", None, "PyTorch intra-op threads (default: os.cpu_count())")
_OUT = flags.DEFINE_string("out", None, "JSON output (default runs/benchmarks/compare_torch_<method>_<variant>.json)")
flags.mark_flags_as_required(["config"])


def _timed(fn, n: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``n`` calls of ``fn`` (each call blocks until its result is ready)."""
    import resource
    import time
    wall, cpu = [], []
    for _ in range(n):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall.append(time.perf_counter() - t)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return wall, cpu


def compare(config, *, steps: int, warmup: int, alternations: int, threads: int | None, log=print) -> dict:
    """Builds both steps, warms them up and times them alternately; returns the JSON-serialisable result."""
    import dataclasses
    import statistics
    import time

    import jax
    import numpy as np
    import torch
    from benchmarks import torch_mgca
    from medvlp_jax import benchmark_lib, sharding as sharding_lib

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    host_batch = benchmark_lib.synthetic_batch(config, config.train.batch_size)

    # JAX: the launcher's step, one device.
    devices = jax.devices()[:1]
    state, step, mesh = benchmark_lib.build_step(config, devices)
    state = dataclasses.replace(state, step=jax.device_put(np.asarray(10**6, np.asarray(state.step).dtype),
                                                           state.step.sharding))
    batch = sharding_lib.to_global(host_batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    log(f"JAX step compiled in {compile_s:.1f} s")
    jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    box = {"state": state}

    def jax_step():
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready(metrics)

    # PyTorch: the stand-in.
    model = torch_mgca.TorchMgca(config)
    opt = torch_mgca.make_optimizer(model, config.optim)
    tbatch = torch_mgca.to_torch(host_batch)
    torch_params = sum(p.numel() for p in model.parameters())

    def torch_step():
        torch_mgca.train_step(model, opt, tbatch)

    _timed(jax_step, warmup)
    _timed(torch_step, warmup)
    rounds = []
    for i in range(alternations):
        load = os.getloadavg()[0]
        jw, jc = _timed(jax_step, steps)
        tw, tc = _timed(torch_step, steps)
        rounds.append({"jax_s": jw, "jax_cpu_s": jc, "torch_s": tw, "torch_cpu_s": tc,
                       "load_average_before": load, "load_average_after": os.getloadavg()[0]})
        log(f"round {i + 1}/{alternations}: JAX {statistics.median(jw):.3f} s, PyTorch {statistics.median(tw):.3f} s "
            f"(load {load:.1f})")
    med = lambda key: statistics.median([x for r in rounds for x in r[key]])
    jax_s, torch_s = med("jax_s"), med("torch_s")
    return {
        "config": {"method": config.method.name, "variant": config.get("variant", ""),
                   "batch_size": int(config.train.batch_size), "image": int(config.data.crop),
                   "text_len": int(config.data.max_text_len), "dtype": config.model.dtype,
                   "clip_norm": float(config.optim.clip_norm or 0.0),
                   "prng_impl": config.train.get("prng_impl", "threefry2x32")},
        "jax": {"step_s": jax_s, "cpu_s": med("jax_cpu_s"), "compile_s": compile_s, "params": jax_params,
                "version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "torch": {"step_s": torch_s, "cpu_s": med("torch_cpu_s"), "params": torch_params,
                  "version": torch.__version__, "threads": threads,
                  "what": "our PyTorch stand-in (transformers ViTModel + BertModel, MGCA heads, port of our MGCA "
                          "loss, AdamW), not the authors' code"},
        "ratio_jax_over_torch": jax_s / torch_s,
        "rounds": rounds, "cpu_count": os.cpu_count(),
    }


def markdown(r: dict) -> str:
    c = r["config"]
    images = lambda s: c["batch_size"] / s
    lines = [f"{c['method']} batch {c['batch_size']}, {c['image']} px, {c['text_len']} tokens, {c['dtype']}, "
             f"clip_norm {c['clip_norm']:g}; median over {sum(len(x['jax_s']) for x in r['rounds'])} steps per side "
             f"in {len(r['rounds'])} alternations", "",
             "| step | s/step | images/s | process CPU s/step | parameters |", "|---|---|---|---|---|",
             f"| medvlp_jax (jax {r['jax']['version']}, prng {c['prng_impl']}) | {r['jax']['step_s']:.3f} | "
             f"{images(r['jax']['step_s']):.2f} | {r['jax']['cpu_s']:.2f} | {r['jax']['params']:,} |",
             f"| PyTorch stand-in (torch {r['torch']['version']}, {r['torch']['threads']} threads; NOT the authors' "
             f"code) | {r['torch']['step_s']:.3f} | {images(r['torch']['step_s']):.2f} | {r['torch']['cpu_s']:.2f} | "
             f"{r['torch']['params']:,} |", "",
             f"Ratio JAX / PyTorch: **{r['ratio_jax_over_torch']:.2f}** (< 1: JAX faster). "
             f"JAX compile {r['jax']['compile_s']:.0f} s. Host load "
             f"{r['rounds'][0]['load_average_before']:.1f} -> {r['rounds'][-1]['load_average_after']:.1f} "
             f"({r['cpu_count']} CPUs)."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import json
    from medvlp_jax import app as app_lib

    def body():
        config = _CONFIG.value
        result = compare(config, steps=_STEPS.value, warmup=_WARMUP.value, alternations=_ALTERNATIONS.value,
                         threads=_THREADS.value)
        result["argv"] = sys.argv[1:]
        print(markdown(result))
        out = _OUT.value or os.path.join("runs", "benchmarks",
                                         f"compare_torch_{config.method.name}_{config.get('variant', '')}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")

    app_lib.run_main(body)


if __name__ == "__main__":
    from medvlp_jax.app import parse_flags
    app.run(main, flags_parser=parse_flags)
