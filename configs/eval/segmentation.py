"""Segmentation with a decoder on the frozen image encoder (methods.md 10.2; MGCA's segmenter).

  python launch/evaluate.py --config=configs/eval/segmentation.py --checkpoint=runs/convirt_demo   # its own data
  python launch/evaluate.py --config=configs/eval/segmentation.py:siim --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/segmentation.py:rsna,root=/data/prepared/rsna --checkpoint=runs/mgca
  ... --config.segmentation.finding=effusion --config.segmentation.finetune_encoder=True

Protocol (medvlp_jax/evaluators/segmentation.py): SETR progressive-upsampling decoder on the patch grid, loss
10 * focal(gamma 2) - log(soft Dice), AdamW lr 5e-4 / wd 0.05, <= 50 epochs, early stop on the validation
loss (patience 10), label fractions 1% / 10% / 100% of the training image ids (seed 42), MGCA Dice on test.

Presets (data prepared with launch/prepare_data.py; ``root=`` points elsewhere):
  demo   the checkpoint's own data (demo: the union of every drawn finding's mask); two decoder stages
         (64/32) predicting at 1/4 of the image, logits resized; <= 20 epochs, patience 5 (minutes on a CPU).
  siim   data/siim: pneumothorax masks; training set balanced (all positives + as many negatives); batch 8.
  rsna   data/rsna: pneumonia boxes rasterised as masks, negatives included; batch 16.
  fast   the checkpoint's own data, 100% only, 2 epochs, a tiny decoder: a smoke test (CI, notebooks).
Results: <checkpoint>/eval/segmentation.json ("1%/dice", "1%/mgca_dice", "1%/val_dice", protocol/...).
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "siim", "rsna", "fast")
ROOTS = {"demo": "", "siim": "data/siim", "rsna": "data/rsna", "fast": ""}


def segmentation_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``segmentation`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0                   # feature-extraction / inference batch (0: the checkpoint's training batch)
    c.seed = 42                        # label-fraction subsets, negative balancing, head init, minibatch order
    c.fractions = (0.01, 0.1, 1.0)
    c.finding = ""                     # "" = union of every finding's mask; else one finding name
    c.balance_negatives = False        # SIIM: train on all positives + as many random negatives
    c.decoder_widths = (512, 256, 128, 64)
    c.decoder_stages = -1              # x2 stages; -1: up to the image size (MGCA); fewer: logits resized
    c.finetune_encoder = False         # MGCA freezes the encoder; True trains it too (GLoRIA's SIIM protocol)
    c.lr = 5e-4
    c.weight_decay = 0.05
    c.head_batch_size = 16
    c.epochs = 50
    c.patience = 10
    c.focal_weight = 10.0
    c.focal_gamma = 2.0
    c.limit_examples = 0               # > 0: read only this many examples per split (debugging)
    if preset == "demo":
        c.decoder_widths, c.decoder_stages = (64, 32), 2      # predicts at 1/4 of the image: CPU-friendly
        c.epochs, c.patience = 20, 5
    elif preset == "siim":
        c.balance_negatives = True
        c.head_batch_size = 8
    elif preset == "fast":
        c.fractions = (1.0,)
        c.decoder_widths, c.decoder_stages = (16,), 1
        c.epochs, c.patience = 2, 2
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["segmentation"]
    c.segmentation = segmentation_config(a.preset, a.root)
    return c
