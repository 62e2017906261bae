"""Linear probe on the frozen image encoder (methods.md 10.1).

  python launch/evaluate.py --config=configs/eval/linear_probe.py --checkpoint=runs/convirt_demo   # its own data
  python launch/evaluate.py --config=configs/eval/linear_probe.py:chexpert --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/linear_probe.py:rsna,root=/data/prepared/rsna --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/linear_probe.py:covidx --checkpoint=runs/mgca --untrained

Presets (MGCA's hyper-parameters: AdamW lr 5e-4, wd 1e-6, batch 48, <= 50 epochs, patience 10; label fractions
1% / 10% / 100%, nested, seed 42):
  demo      the checkpoint's own data root and classes (multi-label: macro AUROC).
  chexpert  data/chexpert, 5 competition labels, test = official validation set; macro AUROC.
  rsna      data/rsna, pneumonia (binary); AUROC.
  covidx    data/covidx, 3 classes (softmax); accuracy.
Results: <checkpoint>/eval/linear_probe.json ("1%/macro_auroc", ..., "protocol/1%/n_train", ...).
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "chexpert", "rsna", "covidx")
ROOTS = {"demo": "", "chexpert": "data/chexpert", "rsna": "data/rsna", "covidx": "data/covidx"}


def linear_probe_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``linear_probe`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0               # feature-extraction batch (0: the checkpoint's training batch)
    c.seed = 42                    # label-fraction subsets and minibatch order
    c.task = "auto"                # auto | multilabel (BCE, AUROC) | multiclass (softmax, accuracy)
    c.fractions = (0.01, 0.1, 1.0)
    c.lr = 5e-4
    c.weight_decay = 1e-6
    c.head_batch_size = 48         # <= 0: full batch
    c.epochs = 50
    c.patience = 10
    c.standardize = False          # z-score the features with training statistics (MGCA: no)
    if preset == "chexpert":
        c.data.class_names = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["linear_probe"]
    c.linear_probe = linear_probe_config(a.preset, a.root)
    return c
