"""Zero-shot classification of a pretrained checkpoint (methods.md 10.6, 3.4).

  python launch/evaluate.py --config=configs/eval/zero_shot.py --checkpoint=runs/convirt_demo   # its own data
  python launch/evaluate.py --config=configs/eval/zero_shot.py:chexpert5x200 --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/zero_shot.py:rsna,root=/data/prepared/rsna --checkpoint=runs/mgca
  ... --config.zero_shot.mode=pos_neg --config.zero_shot.data.class_names='("opacity","nodule")'

Presets (data prepared with launch/prepare_data.py; ``root=`` points elsewhere):
  demo           the checkpoint's own data root, test split, all its classes, the data set's prompt table.
  chexpert5x200  GLoRIA protocol: multiclass, z-normalised columns, argmax -> accuracy + macro F1; prompts
                 from the severity x subtype x location grammar, 5 per class (seed 6). data/chexpert_5x200.
  chexpert       the 5 competition labels on the official validation set (split "test"), cosine, AUROC.
  rsna, siim     MedKLIP protocol: "{finding}" vs "no {finding}" softmax; AUROC, F1/accuracy at best F1.
  covidx         3-class (normal / pneumonia / COVID-19), multiclass protocol.
Results: <checkpoint>/eval/zero_shot.json and the table eval/results.md.
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "chexpert5x200", "chexpert", "rsna", "siim", "covidx")
ROOTS = {"demo": "", "chexpert5x200": "data/chexpert_5x200", "chexpert": "data/chexpert", "rsna": "data/rsna",
         "siim": "data/siim", "covidx": "data/covidx"}


def zero_shot_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``zero_shot`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0            # extraction batch (0: the checkpoint's training batch), rounded to the devices
    c.seed = 0
    c.task = "auto"             # auto | multilabel | multiclass (auto: multiclass iff one positive per image)
    c.mode = "cosine"           # cosine | pos_neg (MedKLIP)
    c.scoring = "global"        # global | gloria (local + global, methods.md 3.4)
    c.temperature = 1.0         # pos_neg softmax temperature (monotone: does not change the metrics)
    c.strict_accuracy = True    # MedKLIP's `score > threshold` accuracy at the best-F1 threshold
    c.builtin_prompts = True    # use the data set's prompt table (zero_shot.builtin_prompts)
    c.prompts = ml_collections.ConfigDict()   # {class: [prompt, ...]} overrides everything else
    c.templates = ("{}",)       # for classes without prompts: template.format(lower-cased class name)
    c.negative_templates = ("no {}",)
    c.negative_prompts = ml_collections.ConfigDict()
    if preset == "chexpert5x200":
        from medvlp_jax.evaluators.zero_shot import grammar_prompts
        c.task = "multiclass"
        c.prompts = ml_collections.ConfigDict(grammar_prompts(per_class=5, seed=6))
    elif preset == "chexpert":
        c.data.class_names = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    elif preset in ("rsna", "siim"):
        c.mode = "pos_neg"
    elif preset == "covidx":
        c.task = "multiclass"
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["zero_shot"]
    c.zero_shot = zero_shot_config(a.preset, a.root)
    return c
