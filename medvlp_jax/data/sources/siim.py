"""SIIM-ACR Pneumothorax Segmentation → TFRecord shards (segmentation, classification).

Layout read (``source_dir`` = the unpacked download)::

    <source_dir>/train-rle.csv                                   ImageId, EncodedPixels
    <source_dir>/dicom-images-train/<study>/<series>/<ImageId>.dcm   (found recursively by file name)

The real CSV's header is "ImageId, EncodedPixels" (a space before the second name); both spellings are
accepted. ``EncodedPixels`` is " -1" (or "-1") for no pneumothorax, else SIIM's *relative* run-length
code: pairs (gap, length), where each gap counts pixels from the end of the previous run (the first from
pixel 0), over the image flattened **column-major** (top to bottom, then left to right) at the DICOM's
size (1024x1024). An image with several pneumothorax regions has several rows; their masks are unioned.

Here (methods.md 10.2):

* one example per image (id = ImageId, patient_id = the DICOM's PatientID); label "Pneumothorax";
* a positive image has one finding "pneumothorax" whose mask is the union (resized with the image, then
  thresholded at one half) and whose box is the union's bounding box; negatives have no findings;
* split 70/15/15 over **images** (unique ImageIds), seeded. **Fix of an MGCA quirk:** MGCA splits the CSV
  *rows*, so an image with several rows can land in two splits (and its mask is split too); here every
  image, with all its rows, is in exactly one split. (The training-set balancing MGCA does — all positives
  plus as many negatives — is a sampling choice left to the evaluator.)
* DICOMs in the tree without a CSV row are ignored (counted); CSV images without a DICOM are unreadable
  images (an error, or a counted skip with ``skip_bad=True``).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "siim_pneumothorax"
RLE_FILE = "train-rle.csv"
CLASS_NAMES = ("Pneumothorax",)
FINDING = "pneumothorax"
SPLITS = ("train", "validation", "test")


def decode_rle(rle: str, height: int = 1024, width: int = 1024, *, relative: bool = True) -> np.ndarray:
    """Decodes a SIIM run-length code to a boolean mask [height, width].

    Args:
      rle: "gap length gap length ..." (relative, the train-rle.csv format) or "start length ..."
        (absolute, 1-based, Kaggle's stage-2 format with ``relative=False``); "-1" or "" means empty.
      height, width: the image size.
      relative: see above.

    Raises:
      ValueError: odd number of values, negative values, or runs beyond the image.
    """
    text = rle.strip()
    mask = np.zeros(height * width, bool)
    if text in ("", "-1"):
        return mask.reshape(height, width)
    vals = np.array(text.split(), np.int64)
    if vals.size % 2 or (vals < 0).any():
        raise ValueError(f"malformed run-length code ({vals.size} values): {text[:60]}...")
    starts, lengths = vals[0::2], vals[1::2]
    if relative:
        # absolute start of run i = sum of gaps up to i + lengths of the runs before it
        starts = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    else:
        starts = starts - 1
    if (starts < 0).any() or (starts + lengths > mask.size).any():
        raise ValueError(f"run-length code runs outside a {height}x{width} image")
    for s, n in zip(starts, lengths):
        mask[s:s + n] = True
    # column-major: flat index = column * height + row
    return mask.reshape(width, height).T


def read_rle(path: str) -> dict[str, list[str]]:
    """train-rle.csv → ImageId -> its RLE strings (["-1"] for negatives), in file order."""
    import pandas as pd
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]       # the real header is "ImageId, EncodedPixels"
    if "ImageId" not in df.columns or "EncodedPixels" not in df.columns:
        raise ValueError(f"{path}: expected columns ImageId, EncodedPixels; found {list(df.columns)}")
    out: dict[str, list[str]] = {}
    for image_id, rle in zip(df["ImageId"].str.strip(), df["EncodedPixels"]):
        out.setdefault(image_id, []).append(rle.strip())
    return out


def find_dicoms(root: str) -> dict[str, str]:
    """Every *.dcm below ``root``: file stem -> path (the first found, in sorted walk order)."""
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(".dcm"):
                out.setdefault(f[:-4], os.path.join(d, f))
    return out


def _load(payload: dict[str, Any], *, image_size: int, bit_depth: int) -> dict[str, Any]:
    import pydicom
    path = payload["path"]
    pixels, placement = images.load_for_dataset(path, image_size, bit_depth=bit_depth)
    patient = str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientID", "") or "")
    fields = dict(payload["fields"], patient_id=patient or payload["fields"]["id"],
                  image=images.encode_png(pixels))
    rles = [r for r in payload["rles"] if r not in ("", "-1")]
    if not rles:
        return dict(fields, **common.finding_arrays([], [], np.zeros((0, 4)), []))
    full = np.zeros((placement.in_height, placement.in_width), bool)
    for r in rles:
        try:
            full |= decode_rle(r, placement.in_height, placement.in_width)
        except ValueError as e:
            raise ValueError(f"{payload['fields']['id']}: {e}") from e
    rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
    box = placement.normalise_boxes([[rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]])
    return dict(fields, **common.finding_arrays([FINDING], [FINDING], box, [placement.place_mask(full)]))


def prepare_siim(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 8,
                 seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                 split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), bit_depth: int = 8,
                 num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Converts SIIM-ACR Pneumothorax to train/validation/test shards (see the module docstring).

    Args:
      source_dir: directory holding train-rle.csv and the DICOM tree (searched recursively).
      out_dir: output directory.
      image_size: output side (masks are stored at this size too).
      num_shards: shards per split.
      seed: split seed (images).
      skip_bad: count unreadable/missing DICOMs as skips instead of raising.
      limit: at most this many examples per split.
      split_fractions: train/validation/test fractions of images.
      bit_depth: 8 or 16-bit PNGs.
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    path = os.path.join(source_dir, RLE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"SIIM annotations {path!r} are missing; source_dir must hold {RLE_FILE} "
                                "and the DICOM tree")
    rles = read_rle(path)
    dicoms = find_dicoms(source_dir)
    assign = common.split_groups(rles, dict(zip(SPLITS, split_fractions)), seed)
    tasks = []
    for split in SPLITS:
        for image_id in sorted(i for i in rles if assign[i] == split):
            dcm = dicoms.get(image_id, os.path.join(source_dir, f"<not found>/{image_id}.dcm"))
            positive = any(r not in ("", "-1") for r in rles[image_id])
            fields = {"id": image_id, "study_id": image_id, "report": "",
                      "labels": np.array([float(positive)], np.float32)}
            tasks.append(common.Task(split, dcm, {"path": dcm, "rles": rles[image_id], "fields": fields}))
    counts = {"images": len(rles), "rows": sum(len(v) for v in rles.values()),
              "positive_images": sum(any(r not in ("", "-1") for r in v) for v in rles.values()),
              "images_with_several_rows": sum(len(v) > 1 for v in rles.values()),
              "dicoms_without_annotation": len(set(dicoms) - set(rles))}
    return common.write_examples(
        out_dir, name=NAME, class_names=CLASS_NAMES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size, bit_depth=bit_depth), num_shards=num_shards,
        skip_bad=skip_bad, limit=limit, num_workers=num_workers, progress=progress, counts=counts,
        extra_info={"source": NAME, "image_size": image_size, "seed": seed,
                    "split_fractions": list(split_fractions), "split_unit": "image"})
