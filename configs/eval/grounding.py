"""Phrase grounding: similarity maps of finding phrases against their boxes (methods.md 10.5).

  python launch/evaluate.py --config=configs/eval/grounding.py --checkpoint=runs/mgca_demo   # its own data
  python launch/evaluate.py --config=configs/eval/grounding.py:ms_cxr --checkpoint=runs/mgca
  ... --config.grounding.map=cosine          # phrase-patch cosine even for methods with local maps

Protocol (medvlp_jax/evaluators/grounding.py): one query per distinct finding phrase of a test image; map =
the method's word-to-patch maps averaged over the phrase's words (``map=auto`` when the method has them,
else the cosine between the phrase embedding and every patch embedding, MS-CXR's protocol), upsampled
bilinearly to the image; CNR, pointing game and mIoU over thresholds 0.1..0.5, overall and per finding.
A few figures go to <checkpoint>/eval/heatmaps/.

Presets:
  demo    the checkpoint's own data, test split (demo: real report phrases over rendered findings).
  ms_cxr  data/ms_cxr (MS-CXR phrase-box pairs on MIMIC-CXR images), test split.
  fast    as demo, 2 figures (CI, notebooks).
Results: <checkpoint>/eval/grounding.json ("cnr", "pointing_game", "miou", "cnr/<finding>", ...).
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "ms_cxr", "fast")
ROOTS = {"demo": "", "ms_cxr": "data/ms_cxr", "fast": ""}


def grounding_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``grounding`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0                   # (image, phrase) rows per forward call (0: the checkpoint's batch)
    c.seed = 0                         # unused (no training); part of every evaluator config
    c.map = "auto"                     # auto | objective | cosine
    c.also_cosine = True               # also score the phrase-patch cosine maps (cosine/* keys)
    c.also_oracle = True               # also score maps built from the finding masks at the grid (oracle/* keys)
    c.grid_alignment = "encoder"       # cells at the encoder's receptive-field centres | "half_pixel"
    c.num_heatmaps = 8                 # figures written to heatmaps_dir (0: none)
    c.heatmaps_dir = ""                # "" = <checkpoint>/eval/heatmaps
    c.limit_examples = 0
    if preset == "fast":
        c.num_heatmaps = 2
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["grounding"]
    c.grounding = grounding_config(a.preset, a.root)
    return c
