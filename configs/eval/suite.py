"""The whole evaluation suite of a checkpoint: zero-shot, retrieval, linear probe, fine-tuning, segmentation,
detection and phrase grounding, each with its ``demo`` preset (the checkpoint's own data: for the demo run,
the IU reports + rendered radiographs, whose findings carry boxes and masks).

  python launch/evaluate.py --config=configs/eval/suite.py --checkpoint=runs/convirt_demo
  python launch/evaluate.py --config=configs/eval/suite.py:fast --checkpoint=runs/convirt_demo    # CI smoke run
  python launch/evaluate.py --config=configs/eval/suite.py:fast,evaluators=zero_shot+grounding --checkpoint=...
  python launch/evaluate.py --config=configs/eval/suite.py --checkpoint=runs/convirt_demo --untrained   # baseline

Variants:
  demo  every evaluator's ``demo`` preset (label fractions 1/10/100%, MGCA's schedules shortened for a CPU).
  fast  the same evaluators on 100% of the labels with 1-2 epochs and small heads: seconds to a few minutes on
        a CPU; numbers are smoke-test values, not results.
``evaluators=a+b`` keeps a subset (in suite order). Each sub-config is the one of configs/eval/<name>.py, so
any field can be overridden as ``--config.<name>.<field>=...``. Results: <checkpoint>/eval/<name>.json and
the table <checkpoint>/eval/results.md.
"""
import importlib.util
import os

import ml_collections

from medvlp_jax import evaluators

SUITE = ("zero_shot", "retrieval", "linear_probe", "finetune", "segmentation", "detection", "grounding")
PRESETS = ("demo", "fast")
# Evaluators whose own config file has a "fast" preset; the others are shortened here.
OWN_FAST_PRESET = ("segmentation", "detection", "grounding")


def _sub_config(name: str, preset: str, root: str) -> ml_collections.ConfigDict:
    """``<name>_config(preset, root)`` from configs/eval/<name>.py (configs/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"medvlp_eval_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, f"{name}_config")(preset, root)


def suite_config(preset: str = "demo", root: str = "", names=SUITE) -> ml_collections.ConfigDict:
    """The suite's eval config: ``evaluators`` and one sub-config per evaluator."""
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown evaluators {unknown} in the suite; known: {list(SUITE)}")
    c = ml_collections.ConfigDict()
    c.evaluators = [n for n in SUITE if n in names]
    for name in c.evaluators:
        fast = preset == "fast"
        sub = _sub_config(name, "fast" if fast and name in OWN_FAST_PRESET else "demo", root)
        if fast and name in ("linear_probe", "finetune"):
            sub.fractions = (1.0,)
            sub.epochs = 2 if name == "linear_probe" else 1
            sub.patience = 2
        c[name] = sub
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="", evaluators="")
    names = [n for n in a.evaluators.split("+") if n] or list(SUITE)
    return suite_config(a.preset, a.root, names)
