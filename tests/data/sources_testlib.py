"""Helpers for the converter tests: read prepared shards back with tf.data, write DICOM/JPEG fixtures."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import schema


def txv_data_file(name: str) -> Optional[str]:
    """A data file shipped inside the torchxrayvision wheel, or None when the package is not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", name)
    return path if os.path.exists(path) else None


def read_split(root: str, split: str) -> list[dict[str, Any]]:
    """Every record of a split, parsed with tf.data + schema.feature_spec, sorted by ``index``.

    Also checks the manifest: shard counts, and indices 0..n-1 each exactly once.
    """
    import tensorflow as tf
    info = schema.read_info(root)
    n_classes = len(info["class_names"])
    meta = info["splits"][split]
    files = [os.path.join(root, s["file"]) for s in meta["shards"]]
    spec = schema.feature_spec(n_classes)
    out = []
    for shard, f in zip(meta["shards"], files):
        def parse(r):
            ex = tf.io.parse_single_example(r, spec)
            return {k: (v.values if isinstance(v, tf.SparseTensor) else v) for k, v in ex.items()}

        recs = list(tf.data.TFRecordDataset([f]).map(parse).as_numpy_iterator())
        assert len(recs) == shard["num_examples"], (f, len(recs), shard)
        for ex in recs:
            ex = {k: (v.decode() if isinstance(v, bytes) and k != "image" else v) for k, v in ex.items()}
            ex["finding_names"] = [b.decode() for b in ex["finding_names"]]
            ex["finding_phrases"] = [b.decode() for b in ex["finding_phrases"]]
            ex["finding_boxes"] = np.asarray(ex["finding_boxes"], np.float32).reshape(-1, 4)
            dtype = tf.uint16 if _png_bit_depth(ex["image"]) == 16 else tf.uint8
            ex["pixels"] = tf.io.decode_png(ex["image"], dtype=dtype).numpy()[..., 0]
            ex["masks"] = [tf.io.decode_png(m).numpy()[..., 0] for m in ex["finding_masks"]]
            out.append(ex)
    out.sort(key=lambda e: e["index"])
    assert [e["index"] for e in out] == list(range(len(out)))
    assert len(out) == meta["num_examples"]
    return out


def _png_bit_depth(data: bytes) -> int:
    return data[24]          # IHDR bit depth byte


def read_all(root: str) -> dict[str, list[dict[str, Any]]]:
    info = schema.read_info(root)
    return {s: read_split(root, s) for s in info["splits"]}


def assert_patient_disjoint(splits: dict[str, list[dict[str, Any]]]) -> None:
    seen: dict[str, str] = {}
    for name, recs in splits.items():
        for r in recs:
            p = r["patient_id"]
            assert seen.setdefault(p, name) == name, f"patient {p} in {seen[p]} and {name}"


def write_jpeg(path: str, pixels: np.ndarray, quality: int = 95) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)


def write_png(path: str, pixels: np.ndarray) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def flat_image(height: int, width: int, value: int) -> np.ndarray:
    """A uint8 image of one value (survives JPEG and resizing, so a record's image names its source)."""
    return np.full((height, width), value, np.uint8)


def write_dicom(path: str, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                patient_id: str = "anon", bits_stored: Optional[int] = None,
                window: Optional[tuple[float, float]] = None, rescale: Optional[tuple[float, float]] = None,
                voi_lut: Optional[tuple[list[int], np.ndarray]] = None, view: str = "PA") -> None:
    """Writes an uncompressed single-frame grayscale DICOM (Explicit VR Little Endian)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"       # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", list(voi_lut[0]))                # LUTDescriptor
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut[1]])    # LUTData (US, not OW)
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.tobytes()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == pixels.shape


def mgca_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) written out from MGCA's resize_img, for reference."""
    if height > width or height == width:
        nh, nw = size, int(width * size / height)
    else:
        nh, nw = int(height * size / width), size
    return nh, nw, (size - nh) // 2, (size - nw) // 2
