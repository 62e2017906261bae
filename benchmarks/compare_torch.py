"""Our JAX train step next to an equivalent PyTorch step on the same machine: both step times and their ratio.

  python benchmarks/compare_torch.py --config=configs/mgca.py --config.train.batch_size=8 \
      --config.optim.clip_norm=0 --steps=3 --warmup=1 --alternations=3
  python benchmarks/compare_torch.py --config=configs/mgca.py:test --steps=2 --warmup=1 --alternations=1
  python benchmarks/compare_torch.py --config=configs/mgca.py --config.train.batch_size=8 \
      --config.optim.clip_norm=0 --jax_variant='no barrier:model.fusion_barrier=off'      # before/after

The PyTorch row is OUR OWN STAND-IN for the authors' code, not their code (``benchmarks/torch_mgca.py``):
transformers' PyTorch ``ViTModel`` and ``BertModel`` with the config's sizes and dropouts, MGCA's heads, a
port of our MGCA objective, torch.optim.AdamW, gradient clipping off. Compare with
``--config.optim.clip_norm=0`` (the PyTorch step does not clip). The JAX row is the launcher's step
(``benchmark_lib.build_step``: same model, objective, optimizer, shardings, donation), on one device.

Both run in this process on the same synthetic batch (``data.example_batch.example_batch_for``, seed 0), alternately
(``--alternations`` rounds of ``--steps`` JAX steps then ``--steps`` PyTorch steps), so both see the same load
from other programs; the medians over all timed steps are compared. PyTorch uses ``--threads`` intra-op threads
(default: every CPU, as XLA:CPU does), on the GPU when PyTorch sees one (``--torch_device``); with
``--config.model.dtype=bfloat16`` both compute in bfloat16. Prints a Markdown table, writes JSON (``--out``).
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
_TORCH_DEVICE = flags.DEFINE_string("torch_device", None, "PyTorch device: cpu | cuda (default: cuda when PyTorch "
                                    "sees a GPU, else cpu); the JAX row runs on JAX's default backend")
_VARIANTS = flags.DEFINE_multi_string("jax_variant", [], "another JAX row timed in the same alternations: "
                                      "'<label>:<field>=<value>[,<field>=<value>]' applied to a copy of --config, "
                                      "e.g. 'no barrier:model.fusion_barrier=off' (before/after side by side)")
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


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'<label>:<field>=<value>,...' -> (label, {dotted field: value string})."""
    label, sep, rest = text.partition(":")
    if not sep or not label or not rest:
        raise ValueError(f"--jax_variant={text!r}: use '<label>:<field>=<value>[,<field>=<value>]'")
    fields = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--jax_variant={text!r}: {part!r} is not <field>=<value>")
        fields[key.strip()] = value.strip()
    return label, fields


def apply_variant(config, fields: dict[str, str]):
    """A copy of ``config`` with each dotted field set to its value, parsed with the field's current type."""
    import ast
    from medvlp_jax.config_lib import ConfigError
    config = config.copy_and_resolve_references()
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"--jax_variant: the config has no field {key!r}")
        old = node[leaf]
        if isinstance(old, str) or old is None:
            node[leaf] = value
        elif isinstance(old, bool):
            node[leaf] = value.lower() in ("1", "true", "yes", "on")
        else:
            node[leaf] = type(old)(ast.literal_eval(value))
    return config


def compare(config, *, steps: int, warmup: int, alternations: int, threads: int | None, log=print,
            variants: tuple[str, ...] = (), torch_device: str | None = None) -> dict:
    """Builds the steps, warms them up and times them alternately; returns the JSON-serialisable result.

    ``variants`` ('<label>:<field>=<value>,...') add JAX rows built from copies of ``config``, timed in every
    alternation right after the main JAX row. ``torch_device``: see ``--torch_device``. ``config.model.dtype``
    bfloat16 runs the PyTorch forward under bfloat16 autocast (float32 parameters and AdamW, as ours).
    """
    import dataclasses
    import statistics
    import time

    import jax
    import numpy as np
    import torch
    from benchmarks import torch_mgca
    from medvlp_jax import benchmark_lib, sharding as sharding_lib
    from medvlp_jax.data.example_batch import example_batch_for

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    host_batch = example_batch_for(config, config.train.batch_size, seed=0)

    # JAX: the launcher's step, one device (and one per variant).
    devices = jax.devices()[:1]

    def build_jax(cfg, label):
        state, step, mesh = benchmark_lib.build_step(cfg, devices)
        state = dataclasses.replace(state, step=jax.device_put(np.asarray(10**6, np.asarray(state.step).dtype),
                                                               state.step.sharding))
        batch = sharding_lib.to_global(host_batch, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        seconds = time.perf_counter() - t0
        log(f"JAX step ({label}) compiled in {seconds:.1f} s")
        box = {"state": state}

        def run():
            box["state"], metrics = compiled(box["state"], batch)
            jax.block_until_ready(metrics)
        return run, seconds, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    jax_step, compile_s, jax_params = build_jax(config, "config")
    extra = []
    for text in variants:
        label, fields = parse_variant(text)
        run, seconds, _ = build_jax(apply_variant(config, fields), label)
        extra.append({"label": label, "fields": fields, "run": run, "compile_s": seconds})

    # PyTorch: the stand-in.
    torch_device = torch_device or torch_mgca.default_device()
    model = torch_mgca.TorchMgca(config).to(torch_device)
    opt = torch_mgca.make_optimizer(model, config.optim)
    tbatch = torch_mgca.to_torch(host_batch, torch_device)
    torch_device_name = (torch.cuda.get_device_name(torch.device(torch_device)) if torch_device.startswith("cuda")
                         else f"CPU, {threads} threads")
    torch_params = sum(p.numel() for p in model.parameters())

    def torch_step():
        torch_mgca.train_step(model, opt, tbatch)

    _timed(jax_step, warmup)
    for v in extra:
        _timed(v["run"], warmup)
    _timed(torch_step, warmup)
    rounds = []
    for i in range(alternations):
        load = os.getloadavg()[0]
        jw, jc = _timed(jax_step, steps)
        round_ = {"jax_s": jw, "jax_cpu_s": jc}
        for k, v in enumerate(extra):
            round_[f"variant{k}_s"], round_[f"variant{k}_cpu_s"] = _timed(v["run"], steps)
        tw, tc = _timed(torch_step, steps)
        round_.update({"torch_s": tw, "torch_cpu_s": tc, "load_average_before": load,
                       "load_average_after": os.getloadavg()[0]})
        rounds.append(round_)
        shown = "".join(f", {v['label']} {statistics.median(round_[f'variant{k}_s']):.3f} s"
                        for k, v in enumerate(extra))
        log(f"round {i + 1}/{alternations}: JAX {statistics.median(jw):.3f} s{shown}, PyTorch "
            f"{statistics.median(tw):.3f} s (load {load:.1f})")
    med = lambda key: statistics.median([x for r in rounds for x in r[key]])
    jax_s, torch_s = med("jax_s"), med("torch_s")
    variant_rows = [{"label": v["label"], "fields": v["fields"], "step_s": med(f"variant{k}_s"),
                     "cpu_s": med(f"variant{k}_cpu_s"), "compile_s": v["compile_s"],
                     "ratio_over_torch": med(f"variant{k}_s") / torch_s} for k, v in enumerate(extra)]
    return {
        "variants": variant_rows,
        "config": {"method": config.method.name, "variant": config.get("variant", ""),
                   "batch_size": int(config.train.batch_size), "image": int(config.data.crop),
                   "text_len": int(config.data.max_text_len), "dtype": config.model.dtype,
                   "clip_norm": float(config.optim.clip_norm or 0.0),
                   "prng_impl": config.train.get("prng_impl", "threefry2x32")},
        "jax": {"device": devices[0].device_kind, "step_s": jax_s, "cpu_s": med("jax_cpu_s"), "compile_s": compile_s,
                "params": jax_params, "version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "torch": {"step_s": torch_s, "cpu_s": med("torch_cpu_s"), "params": torch_params,
                  "version": torch.__version__, "threads": threads, "device": torch_device_name,
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
             f"| medvlp_jax (jax {r['jax']['version']}, {r['jax'].get('device', '')}, prng {c['prng_impl']}) | "
             f"{r['jax']['step_s']:.3f} | "
             f"{images(r['jax']['step_s']):.2f} | {r['jax']['cpu_s']:.2f} | {r['jax']['params']:,} |",
             f"| PyTorch stand-in (torch {r['torch']['version']}, {r['torch']['device']}; NOT the authors' "
             f"code) | {r['torch']['step_s']:.3f} | {images(r['torch']['step_s']):.2f} | {r['torch']['cpu_s']:.2f} | "
             f"{r['torch']['params']:,} |"]
    for v in r.get("variants", []):
        lines.insert(-1, f"| medvlp_jax, {v['label']} ({', '.join(f'{k}={x}' for k, x in v['fields'].items())}) | "
                         f"{v['step_s']:.3f} | {images(v['step_s']):.2f} | {v['cpu_s']:.2f} | "
                         f"{r['jax']['params']:,} |")
    lines += ["",
             f"Ratio JAX / PyTorch: **{r['ratio_jax_over_torch']:.2f}** (< 1: JAX faster). "
             f"JAX compile {r['jax']['compile_s']:.0f} s. Host load "
             f"{r['rounds'][0]['load_average_before']:.1f} -> {r['rounds'][-1]['load_average_after']:.1f} "
             f"({r['cpu_count']} CPUs)."]
    lines += [f"Ratio JAX ({v['label']}) / PyTorch: {v['ratio_over_torch']:.2f}." for v in r.get("variants", [])]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import json
    from medvlp_jax import app as app_lib

    def body():
        config = _CONFIG.value
        result = compare(config, steps=_STEPS.value, warmup=_WARMUP.value, alternations=_ALTERNATIONS.value,
                         threads=_THREADS.value, variants=tuple(_VARIANTS.value),
                         torch_device=_TORCH_DEVICE.value)
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
