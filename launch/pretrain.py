"""Pretrain a vision-language model.

  python launch/pretrain.py --config=configs/convirt.py:demo --workdir=runs/convirt_demo
  python launch/pretrain.py --config=configs/mgca.py --workdir=runs/mgca --config.train.batch_size=64

A rerun with the same --workdir resumes from its latest checkpoint on the same data order; a config that would
change the run (schedule, batch, model, method, data) is refused unless --allow_config_change.
Ctrl-C or SIGTERM saves a checkpoint at the current step and exits (a second Ctrl-C aborts at once).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:variant]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard events and results go")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume a workdir although the config "
                                          "differs from its config.json (the old one is kept beside it)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from medvlp_jax import app as app_lib
    app_lib.run_main(lambda: _train())


def _train():
    from medvlp_jax.evaluators import quick
    from medvlp_jax.train import loop
    loop.run(_CONFIG.value, _WORKDIR.value, end_of_run_eval=quick.evaluate_state,
             allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
    from medvlp_jax.app import parse_flags
    app.run(main, flags_parser=parse_flags)
