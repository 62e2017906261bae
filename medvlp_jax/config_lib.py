"""Config helpers: ``parse_arg`` for ``configs/<method>.py:<variant>``, the shared base config, validation.

Every ``configs/<method>.py`` calls ``base(variant)`` for the data/model/optimiser/mesh/checkpoint defaults
of the variant, then sets ``config.method`` with ``method_config`` (only the fields whose value differs
from the method's settings dataclass, plus the defaults it shows). Variants, each a named preset below:

  PAPER   (no variant) the paper's setup, every field of the base config: MIMIC-CXR, ViT-B/16 at 224,
          BERT-base (Bio_ClinicalBERT) at 112 tokens, batch 144.
  DEMO    (demo) what differs from PAPER: the built-in demo data (IU reports + rendered radiographs), a small
          ResNet (``image=vit``: the tiny ViT) and a 2-layer BERT, minutes on a CPU.
  TEST    (test) what differs from DEMO: the demo shapes shrunk further: seconds; used by the test suite.

The image encoder (``IMAGE_PRESETS``, sizes from ``models.model_config``) is chosen per variant and ``image``.
Extra ``key=value`` pairs after the variant set fields: ``configs/mgca.py:demo,image=vit``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import ml_collections

from medvlp_jax.errors import ConfigError  # noqa: F401  (re-exported; defined in the bottom layer)
from medvlp_jax.models import model_config

VARIANTS = ("paper", "demo", "test")


PREPARE_COMMANDS = {
    "mimic_cxr": "python launch/prepare_data.py mimic_cxr --source=<MIMIC-CXR-JPG dir> --reports=<reports dir> "
                 "--out=data/mimic_cxr",
    "demo_iu": "python launch/prepare_data.py demo --out=data/demo_iu",
}


def parse_value(key: str, default: Any, text: str) -> Any:
    """The text of ``key=text`` (a config argument) as the type of ``default``.

    Booleans read 1/true/yes and 0/false/no (any case); anything else is a ConfigError, as is a number that
    does not parse. A None default keeps the text.
    """
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"config argument {key}={text!r} is not a boolean (true/false)")
    if default is None:
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"config argument {key}={text!r} is not of type {type(default).__name__}") from None


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py:<arg>`` of this repository, through the launchers' loader (``get_config(arg)``).

    Raises:
        FileNotFoundError: the repository has no configs/<name>.py (configs/ is not a package: an installed
            wheel without the checkout has none).
    """
    import importlib.util
    path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: configs/ of the repository checkout is needed")
    spec = importlib.util.spec_from_file_location(f"medvlp_repo_cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'demo,image=resnet' into ConfigDict(variant='demo', image='resnet', ...defaults)."""
    out = dict(variant="paper", **defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in out:
                raise ConfigError(f"unknown config argument {key!r}; known: {sorted(out)}")
            out[key] = parse_value(key, out[key], value)
        elif part in VARIANTS:
            out["variant"] = part
        else:
            raise ConfigError(f"unknown config variant {part!r}; known: {list(VARIANTS)}")
    return ml_collections.ConfigDict(out)


# ---- the paper setup: every field of the base config, set once ----
PAPER: dict[str, Any] = dict(
    variant="paper",
    seed=0,
    # Prepared TFRecord shards (launch/prepare_data.py).
    data=dict(
        name="mimic_cxr",
        root="data/mimic_cxr",
        train_split="train",
        eval_split="test",
        tokenizer_dir="checkpoints/Bio_ClinicalBERT",
        max_text_len=112,
        resize=256,                 # resize the stored image to this
        crop=224,                   # random crop (train) / center crop (eval)
        channels=3,                 # grayscale replicated for ImageNet stems
        random_flip=False,          # MGCA uses no flips (a flip swaps left/right findings in the report)
        shuffle_buffer=10_000,
        skip_bad_records=False,     # True: corrupt records are counted and skipped, not fatal
        prefetch=2,                 # host-side batches prepared ahead of the step
        # Shard files are split into this many streams (0: one per process). A fixed value (e.g. 2) gives the
        # same global batches on any process count that divides it, so runs resume across process counts.
        num_streams=0,
        auto_prepare=False,         # True: the run prepares its own data on first run (the demo)
    ),
    # config.model: fields and their meaning in models/model_config.py; the image encoder comes from
    # IMAGE_PRESETS (its image_size and channels from data.crop and data.channels).
    model=dict(
        image=dict(hf_checkpoint="", pool="cls"),   # global image feature: [CLS] as the papers
        # Bio_ClinicalBERT, first 6 layers (MGCA).
        text=dict(vocab_size=28996, width=768, depth=6, num_heads=12, mlp_dim=3072, max_position=512,
                  type_vocab_size=2, layer_norm_eps=1e-12, dropout=0.1, use_position_ids=True,
                  merge_word_pieces=True, sum_last_layers=1, pool="cls",
                  hf_checkpoint="checkpoints/Bio_ClinicalBERT"),
        proj=dict(kind="mlp_bn", dim=128, hidden=2048),
        dtype="float32",            # compute dtype; "bfloat16" keeps float32 master weights
        remat=False,                # jax.checkpoint per encoder block (fits larger batches)
        fusion_barrier="auto",      # "auto": on for XLA:CPU (models/fusion_barrier.py); "on" / "off"
    ),
    # MGCA: AdamW 2e-5, wd 0.05, 40% linear warm-up then cosine, per step.
    optim=dict(lr=2e-5, min_lr=1e-8, weight_decay=0.05, b1=0.9, b2=0.999, warmup_fraction=0.4, clip_norm=1.0,
               grad_accum_steps=1),
    # Training length, logging, checkpoints.
    train=dict(
        batch_size=144,             # global batch
        epochs=50,
        total_steps=-1,             # -1: derive from epochs
        log_every_steps=50,
        ckpt_every_steps=1000,
        keep_ckpts=3,
        nonfinite="skip",           # "skip": drop the update and count it; "stop": raise with step + record ids
        # Generator of the dropout bits (train/step.py PRNG_IMPLS). threefry2x32 = the state key itself, as all
        # earlier runs; philox4x32 was ~0.5% faster on CPU at the paper config (docs/benchmarks.md), rbg slower.
        prng_impl="threefry2x32",
        # Log the method's word-to-region map statistics on each training batch (Objective.map_diagnostics, as
        # attention/*: e.g. GLoRIA's [CLS] share of its first softmax); metrics only, the loss is unchanged.
        map_diagnostics=True,
        eval_at_end=True,
    ),
    mesh=dict(data=-1, fsdp=1),     # -1: all remaining devices
    # First matching regex wins. 'fsdp' shards the largest dim divisible by the fsdp axis size.
    param_sharding=[(r".*(kernel|embedding|prototypes)", "fsdp"), (r".*", "replicate")],
    method=dict(),                  # set by configs/<method>.py (method_config)
    # Zero-shot prompts per class for the end-of-run evaluation (class name itself when absent).
    evals=dict(),
)

# ---- the demo: what differs from PAPER ----
DEMO: dict[str, Any] = dict(
    variant="demo",
    data=dict(name="demo_iu", root="data/demo_iu", tokenizer_dir="data/demo_iu/tokenizer", max_text_len=64,
              resize=146, crop=128, channels=1, shuffle_buffer=2_048,
              auto_prepare=True),   # the demo prepares its own data on first run
    model=dict(
        # The small demo models learn much faster from mean-pooled patches than from [CLS].
        image=dict(pool="gap"),
        text=dict(vocab_size=3000, width=128, depth=2, num_heads=2, mlp_dim=512, max_position=128, dropout=0.0,
                  pool="mean", hf_checkpoint=""),
        proj=dict(kind="linear", hidden=256),
    ),
    optim=dict(lr=1e-3, weight_decay=1e-4, warmup_fraction=0.1),
    train=dict(batch_size=64, epochs=0, total_steps=700, log_every_steps=25, ckpt_every_steps=100),
)

# ---- the test variant: what differs from DEMO (the demo shapes shrunk further) ----
TEST: dict[str, Any] = dict(
    variant="test",
    data=dict(root="", tokenizer_dir="tokenizer", max_text_len=16, resize=40, crop=32, shuffle_buffer=64,
              auto_prepare=False),  # tests point data.root and data.tokenizer_dir at data they prepared
    model=dict(text=dict(vocab_size=500, width=32, depth=1, num_heads=2, mlp_dim=64), proj=dict(dim=16)),
    train=dict(batch_size=8, total_steps=6, log_every_steps=2, ckpt_every_steps=3),
)


def merged(base_tree: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base_tree`` with each of ``overrides`` deep-merged onto it in turn.

    An override may only set keys that ``base_tree`` has (so every variant has the same fields); a dict
    value merges into the dict it replaces, anything else replaces the value.
    """
    out = copy.deepcopy(base_tree)
    for override in overrides:
        for key, value in override.items():
            if key not in out:
                raise KeyError(f"preset sets {key!r}, which the base config does not have; known: {sorted(out)}")
            out[key] = merged(out[key], value) if isinstance(value, dict) and out[key] else copy.deepcopy(value)
    return out


VARIANT_PRESETS = {"paper": PAPER, "demo": merged(PAPER, DEMO), "test": merged(PAPER, DEMO, TEST)}

# The image encoder of each variant (config.model.image, less the fields set above): sizes from the models'
# presets. ResNet: the papers' 224 crop is upsampled to 299 (GLoRIA); the local grid is layer3 (stride 16, the
# papers; "layer2": stride 8).
IMAGE_PRESETS = {
    "paper": {"vit": dict(name="vit", **model_config.VIT_B16),
              "resnet": dict(name="resnet50", **model_config.RESNET50, resize_to=299, local_stage="layer3")},
    "demo": {"vit": dict(name="vit", **model_config.VIT_TINY),
             "resnet": dict(name="resnet50", **model_config.RESNET_DEMO, resize_to=0, local_stage="layer3")},
    "test": {"vit": dict(name="vit", **model_config.VIT_TEST),
             "resnet": dict(name="resnet50", **model_config.RESNET_TEST, resize_to=0, local_stage="layer3")},
}
# Image encoder per variant when a config does not choose one. The demo uses the small ResNet: on 3,142 rendered
# images and minutes of CPU the convolutional net learns the small findings much faster than the tiny ViT
# (ConVIRT demo, 500 steps: test R@1 2.0% vs 0.8%, R@10 22.7% vs 9.7%) and its step is ~1.7x cheaper.
DEFAULT_IMAGE = {"paper": "vit", "demo": "resnet", "test": "vit"}
IMAGE_ENCODERS = ("vit", "resnet")


def base(variant: str = "paper", image: str = "") -> ml_collections.ConfigDict:
    """The shared defaults for one variant (see module docstring); ``image`` '' = ``DEFAULT_IMAGE[variant]``."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    image = image or DEFAULT_IMAGE[variant]
    if image not in IMAGE_ENCODERS:
        raise ConfigError(f"unknown image encoder image={image!r}; known: {list(IMAGE_ENCODERS)}")
    tree = merged(VARIANT_PRESETS[variant])
    data = tree["data"]
    tree["model"]["image"] = dict(IMAGE_PRESETS[variant][image], image_size=data["crop"], channels=data["channels"],
                                  **tree["model"]["image"])
    if variant == "demo":
        from medvlp_jax.data.sources.demo_iu import PROMPTS
        tree["evals"]["prompts"] = {k: list(v) for k, v in PROMPTS.items()}
    return ml_collections.ConfigDict(tree)


def setting_defaults(settings_cls, *fields: str) -> dict[str, Any]:
    """``{field: default}`` for the named fields of the frozen settings dataclass ``settings_cls``.

    How a config shows a field at its default (so that ``--config.<...>.<field>=...`` can override it and the
    run's config.json records it) without writing the value a second time. A name that is not a field of
    ``settings_cls`` is a ConfigError.
    """
    known = {f.name: f for f in dataclasses.fields(settings_cls)}
    for name in fields:
        if name not in known:
            raise ConfigError(f"{settings_cls.__name__} has no field {name!r}; known: {sorted(known)}")
    return {name: known[name].default if known[name].default is not dataclasses.MISSING
            else known[name].default_factory() for name in fields}


def method_config(name: str, settings_cls, *shown: str, **values: Any) -> ml_collections.ConfigDict:
    """``config.method`` for method ``name``: what a ``configs/<name>.py`` sets.

    Args:
      name: the method's name in ``OBJECTIVES``.
      settings_cls: the dataclass that the method's ``make`` reads ``config.method`` into
        (``methods.local_ops.read_config``): the one home of every default.
      *shown: fields shown at their ``settings_cls`` default (``setting_defaults``).
      **values: the fields this config sets to something else (in some or all variants).
    """
    setting_defaults(settings_cls, *values)         # every set name must be a field too
    return ml_collections.ConfigDict(dict(name=name, **{**setting_defaults(settings_cls, *shown), **values}))


def steps_per_epoch(config, num_train_examples: int) -> int:
    return max(1, num_train_examples // config.train.batch_size)


def validate(config, *, num_devices: int) -> None:
    """Checks the fields that would otherwise fail deep inside JAX or tf.data. Raises ConfigError."""
    from medvlp_jax.methods import OBJECTIVES
    if config.method.get("name") not in OBJECTIVES:
        raise ConfigError(f"config.method.name={config.method.get('name')!r} is not a known method; "
                          f"use one of {OBJECTIVES.names()}")
    root = config.data.root
    if not root or not os.path.exists(os.path.join(root, "dataset_info.json")):
        if not config.data.auto_prepare:
            raise ConfigError(f"config.data.root={root!r} holds no prepared data set; run: "
                              f"{PREPARE_COMMANDS.get(config.data.name, 'python launch/prepare_data.py --help')}"
                              f" (or point --config.data.root at prepared shards)")
    bs = config.train.batch_size
    if not isinstance(bs, int) or bs <= 0:
        raise ConfigError(f"config.train.batch_size={bs!r} must be a positive number of examples per step "
                          f"(a multiple of the {num_devices} devices)")
    for field in ("log_every_steps", "keep_ckpts"):
        if config.train[field] < 1:
            raise ConfigError(f"config.train.{field}={config.train[field]!r} must be at least 1")
    if not (config.train.get("total_steps") or 0) > 0 and not config.train.get("epochs", 0) > 0:
        raise ConfigError(f"config.train.total_steps={config.train.get('total_steps')!r} and config.train.epochs="
                          f"{config.train.get('epochs')!r}: set one of them to a positive number")
    if bs % num_devices:
        raise ConfigError(f"config.train.batch_size={bs} is not divisible by the {num_devices} devices; "
                          f"set --config.train.batch_size to a multiple of {num_devices}")
    accum = config.optim.grad_accum_steps
    if accum < 1 or bs % accum or (bs // accum) % num_devices:
        raise ConfigError(f"config.optim.grad_accum_steps={accum} must divide train.batch_size={bs} into "
                          f"micro-batches divisible by {num_devices} devices")
    if config.data.crop > config.data.resize:
        raise ConfigError(f"config.data.crop={config.data.crop} is larger than config.data.resize="
                          f"{config.data.resize}")
    if config.model.image.name == "vit" and config.data.crop % config.model.image.patch_size:
        raise ConfigError(f"config.data.crop={config.data.crop} is not a multiple of "
                          f"config.model.image.patch_size={config.model.image.patch_size}")
    if config.train.nonfinite not in ("skip", "stop"):
        raise ConfigError(f"config.train.nonfinite={config.train.nonfinite!r}; use 'skip' or 'stop'")
    for field in ("tokenizer_dir",):
        path = config.data[field]
        if path and not os.path.isdir(path) and not config.data.auto_prepare:
            raise ConfigError(f"config.data.{field}={path!r} does not exist; point it at a local Hugging Face "
                              f"tokenizer directory")
    ckpt = config.model.text.get("hf_checkpoint", "")
    if ckpt and not os.path.isdir(ckpt):
        raise ConfigError(f"config.model.text.hf_checkpoint={ckpt!r} does not exist; download the checkpoint "
                          f"directory (config.json + weights) there, or set it to '' to train from scratch")


# Fields a resumed run may change without --allow_config_change: how often it logs or saves, how many checkpoints
# it keeps, the end-of-run evaluation, what a non-finite step does, prefetch depth and the device layout (a
# checkpoint restores onto any mesh). Every other field changes the run (schedule, batch, model, method, data).
RESUME_NEUTRAL_FIELDS = ("train.log_every_steps", "train.ckpt_every_steps", "train.keep_ckpts", "train.eval_at_end",
                         "train.nonfinite", "train.map_diagnostics", "data.prefetch", "mesh", "param_sharding", "model.remat",
                         "model.fusion_barrier")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def resume_config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ between two configs (as JSON dicts) and change the run.

    A field present in one only counts as changed; ``RESUME_NEUTRAL_FIELDS`` (and fields under them) do not.
    """
    a, b = _flatten(old), _flatten(new)
    neutral = lambda k: any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL_FIELDS)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not neutral(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_output_dir(path: str, flag: str) -> None:
    """Creates ``path`` if needed and checks that files can be written there; raises ConfigError naming ``flag``.

    Called before any expensive work, so a wrong --workdir costs nothing and loses nothing.
    """
    import tempfile
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a file, not a directory; pass a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medvlp_write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}={path} is not writable ({e.strerror or e}); pass a directory you can write to"
                          ) from None


def check_output_file(path: str, flag: str) -> None:
    """Checks before any work that ``path`` can be written (its directory is created if needed); raises
    ConfigError naming ``flag``. Nothing is written to ``path`` itself."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a directory; pass a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), f"the directory of {flag}={path}")
