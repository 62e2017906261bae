"""Object-CXR (foreign objects on chest X-rays, MIDL 2020 challenge) → TFRecord shards for detection.

Layout read (``source_dir`` = the unpacked release)::

    <source_dir>/train.csv        image_name,annotation     (the challenge README calls the first column
    <source_dir>/dev.csv          image_name,annotation      image_path; either name is read, basename used)
    <source_dir>/train/<image_name>                         JPEG
    <source_dir>/dev/<image_name>

``annotation`` is empty for an image without foreign objects, else ``;``-separated shapes
``TYPE x1 y1 x2 y2 ...`` in pixels (origin top-left, x to the right, y down): TYPE 0 = rectangle and 1 = ellipse,
each given by its bounding box ``x1 y1 x2 y2``; 2 = polygon ``x1 y1 ... xn yn`` (n >= 3).

Here (methods.md 10.3, MGCA's protocol):

* the official ``train`` images split 90/10 into train/validation with ``seed`` (MGCA: seed 0); the official
  ``dev`` images (1,000) are the test split; one example per image (id = patient_id = image name: the release
  has no patient ids);
* every shape is a finding "foreign object" whose box is the shape's bounding box (ellipses and polygons
  converted to boxes, as MGCA does), normalised (ymin, xmin, ymax, xmax) in the padded output image; its mask
  is the shape itself rasterised at the output size (pixel centres inside the rectangle, ellipse or polygon);
* label "Foreign object" = 1 when the image has any shape;
* images: longer side → ``image_size``, zero-pad (``images.load_for_dataset``).

A malformed annotation raises ``ValueError`` naming the CSV file, its line and what is wrong.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "object_cxr"
CSV_FILES = {"train": "train.csv", "test": "dev.csv"}
IMAGE_DIRS = {"train": "train", "test": "dev"}
CLASS_NAMES = ("Foreign object",)
FINDING = "foreign object"
SPLITS = ("train", "validation", "test")
SHAPES = {0: "rectangle", 1: "ellipse", 2: "polygon"}


def parse_annotation(text: str, where: str = "") -> list[tuple[str, np.ndarray]]:
    """One CSV ``annotation`` cell → [(shape, points [k, 2] as (x, y) pixels)].

    Rectangles and ellipses give their two bounding-box corners, polygons their vertices.
    """
    shapes = []
    text = "" if text is None or text != text else str(text)          # NaN from an empty CSV cell
    for k, part in enumerate(p for p in text.split(";") if p.strip()):
        tokens = part.split()
        try:
            kind, values = int(tokens[0]), [float(t) for t in tokens[1:]]
        except ValueError:
            raise ValueError(f"{where}: shape {k} {part.strip()!r} is not 'TYPE x1 y1 x2 y2 ...' numbers") from None
        if kind not in SHAPES:
            raise ValueError(f"{where}: shape {k} has type {kind}; expected 0 (rectangle), 1 (ellipse) or "
                             "2 (polygon)")
        points = np.asarray(values, np.float64)
        if kind in (0, 1):
            if points.size != 4:
                raise ValueError(f"{where}: {SHAPES[kind]} {k} has {points.size} coordinates; expected x1 y1 x2 y2")
            points = points.reshape(2, 2)
            if not (points[0] < points[1]).all():
                raise ValueError(f"{where}: {SHAPES[kind]} {k} {values} needs x1 < x2 and y1 < y2")
        elif points.size < 6 or points.size % 2:
            raise ValueError(f"{where}: polygon {k} has {points.size} coordinates; expected x y pairs, >= 3 points")
        else:
            points = points.reshape(-1, 2)
        shapes.append((SHAPES[kind], points))
    return shapes


def read_annotations(path: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    """train.csv / dev.csv → image name -> shapes (``parse_annotation``), in file order."""
    import pandas as pd
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    image_col = "image_name" if "image_name" in df.columns else "image_path" if "image_path" in df.columns else None
    if image_col is None or "annotation" not in df.columns:
        raise ValueError(f"{path}: expected columns image_name (or image_path) and annotation, got "
                         f"{list(df.columns)}")
    out: dict[str, list] = {}
    for line, (image, annotation) in enumerate(zip(df[image_col], df["annotation"]), start=2):
        name = os.path.basename(image.strip())
        if not name:
            raise ValueError(f"{path}, line {line}: empty image name")
        if name in out:
            raise ValueError(f"{path}, line {line}: image {name!r} is listed twice")
        out[name] = parse_annotation(annotation, f"{path}, line {line} ({name})")
    return out


def shape_mask(kind: str, points: np.ndarray, placement: images.Placement) -> np.ndarray:
    """The shape rasterised in the output image: uint8 {0, 255} [size, size], pixel centres inside."""
    size = placement.size
    # Input pixels (x, y) → output pixels: scale, then offset by the padding.
    xy = np.stack([points[:, 0] * placement.scale_x + placement.left,
                   points[:, 1] * placement.scale_y + placement.top], axis=1)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    elif kind == "ellipse":
        (x0, y0), (x1, y1) = xy
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    else:
        from matplotlib.path import Path
        inside = Path(xy).contains_points(np.stack([xx.ravel(), yy.ravel()], axis=1)).reshape(size, size)
    return inside.astype(np.uint8) * 255


def shape_box(points: np.ndarray) -> np.ndarray:
    """Bounding box (ymin, xmin, ymax, xmax) in input pixels of a shape's points [k, 2] (x, y)."""
    return np.array([points[:, 1].min(), points[:, 0].min(), points[:, 1].max(), points[:, 0].max()])


def _load(payload: dict[str, Any], *, image_size: int, bit_depth: int) -> dict[str, Any]:
    pixels, placement = images.load_for_dataset(payload["path"], image_size, bit_depth=bit_depth)
    shapes = payload["shapes"]
    boxes = placement.normalise_boxes(np.stack([shape_box(p) for _, p in shapes]) if shapes else np.zeros((0, 4)))
    masks = [shape_mask(kind, p, placement) for kind, p in shapes]
    n = len(shapes)
    return dict(payload["fields"], image=images.encode_png(pixels),
                **common.finding_arrays([FINDING] * n, [FINDING] * n, boxes, masks))


def prepare_object_cxr(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 8,
                       seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                       validation_fraction: float = 0.1, bit_depth: int = 8, num_workers: int = 0,
                       progress: bool = True) -> dict[str, Any]:
    """Converts Object-CXR to train/validation/test shards (see the module docstring).

    Args:
      source_dir: directory holding train.csv, dev.csv, train/ and dev/.
      out_dir: output directory.
      image_size: output side.
      num_shards: shards per split.
      seed: seeds the train/validation split of the official train images.
      skip_bad: count unreadable/missing images as skips instead of raising.
      limit: at most this many examples per split.
      validation_fraction: share of the official train images held out for validation (MGCA: 0.1).
      bit_depth: 8 or 16-bit PNGs.
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    paths = {part: os.path.join(source_dir, csv_name) for part, csv_name in CSV_FILES.items()}
    for path in paths.values():
        if not os.path.exists(path):
            raise FileNotFoundError(f"Object-CXR annotations {path!r} are missing; source_dir must hold "
                                    f"{', '.join(CSV_FILES.values())} and {', '.join(IMAGE_DIRS.values())}/")
    annotations = {part: read_annotations(path) for part, path in paths.items()}
    assign = common.split_groups(annotations["train"], {"train": 1 - validation_fraction,
                                                        "validation": validation_fraction}, seed)
    tasks = []
    for part, by_image in annotations.items():
        for name, shapes in by_image.items():
            split = assign[name] if part == "train" else "test"
            path = os.path.join(source_dir, IMAGE_DIRS[part], name)
            fields = {"id": name, "patient_id": name, "study_id": name, "report": "",
                      "labels": np.array([float(bool(shapes))], np.float32)}
            tasks.append(common.Task(split, path, {"path": path, "shapes": shapes, "fields": fields}))
    order = {s: i for i, s in enumerate(SPLITS)}
    tasks.sort(key=lambda t: (order[t.split], t.payload["fields"]["id"]))
    all_shapes = [s for by_image in annotations.values() for shapes in by_image.values() for s in shapes]
    counts = {"images_with_objects": sum(bool(s) for b in annotations.values() for s in b.values()),
              **{f"{kind}s": sum(k == kind for k, _ in all_shapes) for kind in SHAPES.values()}}
    return common.write_examples(
        out_dir, name=NAME, class_names=CLASS_NAMES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size, bit_depth=bit_depth), num_shards=num_shards,
        skip_bad=skip_bad, limit=limit, num_workers=num_workers, progress=progress, counts=counts,
        extra_info={"source": NAME, "image_size": image_size, "seed": seed,
                    "validation_fraction": validation_fraction})
