"""Object detection with a CenterNet head on the frozen image encoder (methods.md 10.3).

  python launch/evaluate.py --config=configs/eval/detection.py --checkpoint=runs/convirt_demo   # its own data
  python launch/evaluate.py --config=configs/eval/detection.py:rsna --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/detection.py:rsna,root=/data/prepared/rsna --checkpoint=runs/mgca
  python launch/evaluate.py --config=configs/eval/detection.py:object_cxr --checkpoint=runs/mgca
  ... --config.detection.classes=per_name --config.detection.score_threshold=0.05

Protocol (medvlp_jax/evaluators/detection.py): CenterNet head (single scale, two x2 upsampling stages) on the
patch grid; AdamW lr 5e-4 / wd 1e-6, <= 50 epochs, early stop on the validation loss (patience 10); label
fractions 1% / 10% / 100% of the training image ids (seed 42); inference with MGCA's confidence 0.5 and NMS
IoU 0.5; mAP over IoU 0.40:0.05:0.75 counting every test image (``map``) and MGCA's variant that skips images
without detections or boxes (``map_mgca``), AP at IoU 0.5 (``ap50``).

Presets (data prepared with launch/prepare_data.py; ``root=`` points elsewhere):
  demo   the checkpoint's own data, one class per finding name (demo: the drawn findings), one trunk stage
         (output stride 8), head width 32, <= 20 epochs, patience 5 (minutes on a CPU).
  rsna   data/rsna: pneumonia boxes, one class; batch 16 (MGCA: 8 at 1%).
  object_cxr  data/object_cxr: foreign-object boxes (ellipses and polygons as their boxes), one class;
         batch 16; the official dev images are the test split (MGCA's protocol).
  fast   the checkpoint's own data, one class, 100% only, 2 epochs, tiny head: a smoke test (CI, notebooks).
Results: <checkpoint>/eval/detection.json ("1%/map", "1%/map_mgca", "1%/ap50", [".../map/<class>"], protocol/...).
"""
import ml_collections

from medvlp_jax import evaluators

PRESETS = ("demo", "rsna", "object_cxr", "fast")
ROOTS = {"demo": "", "rsna": "data/rsna", "object_cxr": "data/object_cxr", "fast": ""}


def detection_config(preset: str = "demo", root: str = "") -> ml_collections.ConfigDict:
    """The ``detection`` evaluator's sub-config for a preset (see module docstring)."""
    c = ml_collections.ConfigDict()
    c.data = evaluators.default_data(root=root or ROOTS[preset])
    c.batch_size = 0                   # feature-extraction / inference batch (0: the checkpoint's training batch)
    c.seed = 42
    c.fractions = (0.01, 0.1, 1.0)
    c.classes = "single"               # single | per_name | comma-separated finding names
    c.trunk_widths = (256, 128)        # one conv3x3 + up x2 stage each: output stride = patch / 4
    c.head_width = 64
    c.finetune_encoder = False
    c.lr = 5e-4
    c.weight_decay = 1e-6
    c.head_batch_size = 16
    c.epochs = 50
    c.patience = 10
    c.max_objects = 32                 # boxes per training image
    c.size_weight = 0.1                # CenterNet loss weights
    c.offset_weight = 1.0
    c.max_detections = 100             # peaks decoded per image (COCO maxDets)
    c.score_threshold = 0.5            # MGCA's confidence filter
    c.nms_iou = 0.5
    c.limit_examples = 0
    if preset == "demo":
        c.classes = "per_name"
        c.trunk_widths, c.head_width = (64,), 32      # output stride 8 (16x16 for the 128 px demo): CPU-friendly
        c.epochs, c.patience = 20, 5
    elif preset == "fast":
        c.fractions = (1.0,)
        c.trunk_widths = (16,)
        c.head_width = 16
        c.epochs, c.patience = 2, 2
    return c


def get_config(arg=None):
    a = evaluators.parse_config_arg(arg, PRESETS, root="")
    c = ml_collections.ConfigDict()
    c.evaluators = ["detection"]
    c.detection = detection_config(a.preset, a.root)
    return c
