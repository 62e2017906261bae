"""Full fine-tuning of the image encoder + a linear head (same data, fractions and metrics as the linear probe).

  python launch/evaluate.py --config=configs/eval/finetune.py --checkpoint=runs/convirt_demo   # its own data
  python launch/evaluate.py --config=configs/eval/finetune.py:rsna --checkpoint=runs/mgca --config.finetune.epochs=10

Presets: demo (the checkpoint's data root; few epochs, minutes on a CPU for the demo model), chexpert, rsna,
covidx (data/<name>; ``root=`` to point elsewhere). The label-fraction subsets equal the linear probe's for the
same seed. Results: <checkpoint>/eval/finetune.json.
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "chexpert", "rsna", "covidx")
ROOTS = {"demo": "", "chexpert": "data/chexpert", "rsna": "data/rsna", "covidx": "data/covidx"}


def finetune_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``finetune`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0               # global training/eval batch (0: the checkpoint's training batch)
    c.seed = 42
    c.task = "auto"
    c.fractions = (0.01, 0.1, 1.0)
    c.lr = 1e-4 if preset == "demo" else 3e-5
    c.weight_decay = 1e-4 if preset == "demo" else 0.05
    c.epochs = 3 if preset == "demo" else 10
    c.patience = 3
    if preset == "chexpert":
        c.data.class_names = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["finetune"]
    c.finetune = finetune_config(a.preset, a.root)
    return c
