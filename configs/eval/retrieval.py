"""Image-text retrieval of a pretrained checkpoint (methods.md 10.4).

  python launch/evaluate.py --config=configs/eval/retrieval.py --checkpoint=runs/convirt_demo   # its own test split
  python launch/evaluate.py --config=configs/eval/retrieval.py:mimic --checkpoint=runs/mgca      # MIMIC-CXR test
  python launch/evaluate.py --config=configs/eval/retrieval.py:chexpert5x200 --checkpoint=runs/mgca

Presets:
  demo           the checkpoint's own data root: R@1/5/10 image<->report (identical reports count as hits),
                 plus class Precision@K on the images with exactly one positive class.
  mimic          data/mimic_cxr test split, same metrics.
  chexpert5x200  data/chexpert_5x200: no reports, so the text side is the class prompts (the 5x200 grammar);
                 Precision@5/10/100 by class in both directions.
Results: <checkpoint>/eval/retrieval.json and the table eval/results.md.
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "mimic", "chexpert5x200")
ROOTS = {"demo": "", "mimic": "data/mimic_cxr", "chexpert5x200": "data/chexpert_5x200"}


def retrieval_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``retrieval`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0
    c.seed = 0
    c.text = "auto"                       # auto | reports | prompts (auto: prompts when the split has no reports)
    c.duplicate_reports_are_hits = True   # identical report texts count as correct matches
    c.recall_ks = (1, 5, 10)
    c.precision_ks = (5, 10, 100)
    c.builtin_prompts = True              # prompt tables as in zero_shot (text="prompts")
    c.prompts = ml_collections.ConfigDict()
    c.templates = ("{}",)
    if preset == "chexpert5x200":
        from medvlp_jax.evaluators.zero_shot import grammar_prompts
        c.prompts = ml_collections.ConfigDict(grammar_prompts(per_class=5, seed=6))
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["retrieval"]
    c.retrieval = retrieval_config(a.preset, a.root)
    return c
