"""The end-of-run evaluation (retrieval under three hit definitions + zero-shot AUROC) of a checkpoint.

  python launch/evaluate.py --config=configs/eval/quick.py --checkpoint=runs/convirt_demo
  python launch/evaluate.py --config=configs/eval/quick.py --checkpoint=runs/convirt_demo --untrained  # baseline

The same numbers every pretraining run writes to <workdir>/eval_results.json (medvlp_jax/evaluators/quick.py),
so an untrained baseline can be set beside them. Results: <checkpoint>/eval/quick.json and eval/results.md.
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo",)


def quick_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``quick`` evaluator's sub-config: ``split`` ('' = the run's data.eval_split)."""
    del preset, root      # always the run's own data and prompts
    return ml_collections.ConfigDict({"split": ""})


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["quick"]
    c.quick = quick_config(a.preset, a.root)
    return c
