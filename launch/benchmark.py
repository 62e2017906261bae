"""Benchmark the compiled train step (and the input pipeline) of a config.

  python launch/benchmark.py --config=configs/convirt.py:demo
  python launch/benchmark.py --config=configs/convirt.py --config.train.batch_size=8 --steps=5 --warmup=2
  python launch/benchmark.py --config=configs/convirt.py:demo --data_root=data/demo_iu --out=bench.json
  python launch/benchmark.py --config=configs/convirt.py:test --scale=batch_size:8,16 --scale=text_len:8
  python launch/benchmark.py --config=configs/mgca.py --data_root=data/demo_iu --pipeline_only   # tf.data alone

Reports compile time, median step time after warm-up, images/s, XLA-counted FLOPs per step, MFU against the
device peak (CPU: a measured matmul rate), peak device memory, a scaling table (one of batch size / text
length / image size varied at a time; --scale=none to skip) and, with --data_root (or a config whose
data.root is prepared), the input pipeline's examples/s on its own. The step runs on synthetic in-memory
batches, so no data is needed. Prints Markdown and writes JSON (--out). See medvlp_jax/benchmark_lib.py.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
_SCALE = flags.DEFINE_multi_string("scale", None, "axis:v1,v2 with axis in batch_size|text_len|image_size; "
                                   "'none' for no scaling table (default: half/double batch, half text, "
                                   "smaller image)")
_SCALE_STEPS = flags.DEFINE_integer("scale_steps", 3, "timed steps per scaling row")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "prepared data root for the input-pipeline measurement "
                                 "(default: config.data.root when it is prepared)")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 20, "batches timed in the pipeline measurement")
_PIPELINE_ONLY = flags.DEFINE_bool("pipeline_only", False, "measure the input pipeline alone (needs --data_root or "
                                   "a prepared config.data.root): no step is compiled")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default runs/benchmarks/<method>_<variant>_<platform>.json)")
_MARKDOWN = flags.DEFINE_string("markdown", None, "also write the Markdown table to this file")
flags.mark_flags_as_required(["config"])

AXES = ("batch_size", "text_len", "image_size")


def parse_scale(values, config, num_devices):
    from medvlp_jax import benchmark_lib
    if not values:
        return benchmark_lib.default_scaling(config, num_devices)
    if values == ["none"]:
        return {}
    out = {}
    for v in values:
        axis, _, nums = v.partition(":")
        if axis not in AXES or not nums:
            raise ValueError(f"--scale={v!r}: use axis:v1,v2 with axis one of {AXES}")
        out[axis] = [int(x) for x in nums.split(",")]
    return out


def main(argv):
    del argv
    from medvlp_jax import app as app_lib
    app_lib.run_main(_benchmark)


def _benchmark():
    import jax
    from medvlp_jax import benchmark_lib
    from medvlp_jax.config_lib import check_output_file
    config = _CONFIG.value
    devices = jax.devices()
    for flag, path in (("--out", _OUT.value), ("--markdown", _MARKDOWN.value)):   # before minutes of timing
        if path:
            check_output_file(path, flag)
    data_root = _DATA_ROOT.value
    if data_root is None and config.data.root and os.path.exists(os.path.join(config.data.root, "dataset_info.json")):
        data_root = config.data.root
    if _PIPELINE_ONLY.value:
        return _pipeline_only(config, data_root)
    result = benchmark_lib.run(config, steps=_STEPS.value, warmup=_WARMUP.value,
                               scaling=parse_scale(_SCALE.value, config, len(devices)),
                               scaling_steps=_SCALE_STEPS.value, data_root=data_root,
                               pipeline_batches=_PIPELINE_BATCHES.value, devices=devices)
    result["config"] = {"method": config.method.name, "variant": config.get("variant", ""),
                        "argv": sys.argv[1:]}
    title = (f"{config.method.name}:{config.get('variant', '')} — image {config.model.image.name} "
             f"{config.data.crop}px, text {config.model.text.depth} layers x {config.data.max_text_len} tokens, "
             f"{config.model.dtype}")
    md = benchmark_lib.markdown(result, title)
    print(md)
    out = _OUT.value or os.path.join("runs", "benchmarks",
                                     f"{config.method.name}_{config.get('variant', '')}_{devices[0].platform}.json")
    benchmark_lib.write_json(result, out)
    if _MARKDOWN.value:
        with open(_MARKDOWN.value, "w") as f:
            f.write(md)
    print(f"wrote {out}")


def _pipeline_only(config, data_root):
    import json
    from medvlp_jax import benchmark_lib
    if not data_root:
        raise FileNotFoundError("--pipeline_only needs --data_root=<prepared data root> (or a prepared "
                                "config.data.root)")
    cfg = config.copy_and_resolve_references()
    cfg.data.root = data_root
    if not os.path.isdir(cfg.data.tokenizer_dir) and os.path.isdir(os.path.join(data_root, "tokenizer")):
        cfg.data.tokenizer_dir = os.path.join(data_root, "tokenizer")
    pipe = benchmark_lib.pipeline_throughput(cfg, batches=_PIPELINE_BATCHES.value)
    pipe.update(resize=int(cfg.data.resize), crop=int(cfg.data.crop), channels=int(cfg.data.channels),
                text_len=int(cfg.data.max_text_len), data_root=data_root, cpu_count=os.cpu_count(),
                load_average_1m=os.getloadavg()[0])
    print(f"input pipeline ({data_root}, resize {pipe['resize']} crop {pipe['crop']} x {pipe['channels']}, "
          f"{pipe['text_len']} tokens, batch {pipe['batch_size']}): {pipe['examples_per_s']:.0f} examples/s, "
          f"{pipe['examples_per_cpu_s']:.0f} examples per CPU-second (load {pipe['load_average_1m']:.1f})")
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump({"pipeline": pipe}, f, indent=1)


if __name__ == "__main__":
    from medvlp_jax.app import parse_flags
    app.run(main, flags_parser=parse_flags)
