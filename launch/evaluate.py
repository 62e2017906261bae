"""Evaluate a pretraining checkpoint: zero-shot, retrieval, linear probe, fine-tune, and the dense tasks.

  python launch/evaluate.py --config=configs/eval/zero_shot.py --checkpoint=runs/convirt_demo
  python launch/evaluate.py --config=configs/eval/linear_probe.py:chexpert --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/linear_probe.py --checkpoint=runs/mgca --untrained   # baseline
  python launch/evaluate.py --config=configs/eval/zero_shot.py --checkpoint=runs/mgca --step=2000    # one step
  python launch/evaluate.py --config=configs/eval/zero_shot.py --checkpoint=runs/x \
      --config.zero_shot.data.root=data/chexpert_5x200 --config.zero_shot.task=multiclass

Results go to <checkpoint>/eval/<evaluator>.json (<evaluator>_untrained.json with --untrained) and the
Markdown table of every result in that folder, <checkpoint>/eval/results.md, which is also printed.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval/<task>.py[:preset,root=...]",
                                          lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "pretraining workdir (its latest checkpoint is evaluated)")
_STEP = flags.DEFINE_integer("step", None, "evaluate this checkpoint step (default: the newest that restores; an "
                             "explicit step that is missing or corrupt is an error)")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "evaluate the same architecture at initialisation instead")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    del argv
    from medvlp_jax import app as app_lib
    app_lib.run_main(_evaluate)


def _evaluate():
    from medvlp_jax import evaluators, logging_lib
    logging_lib.setup_logging()
    evaluators.run_suite(_CONFIG.value, _CHECKPOINT.value, untrained=_UNTRAINED.value, step=_STEP.value)


if __name__ == "__main__":
    from medvlp_jax.app import parse_flags
    app.run(main, flags_parser=parse_flags)
