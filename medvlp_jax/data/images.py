"""Image I/O shared by the converters: read JPEG/PNG/DICOM, resize-and-pad as MGCA does, encode PNG.

Every reader returns a 2-D grayscale array (chest radiographs are grayscale; RGB files are converted).
The resize follows MGCA's ``resize_img``: scale so that the longer side is ``size`` (the shorter side is
truncated to an integer, aspect ratio kept), then zero-pad the shorter side to ``size`` with the image
centred (``floor`` of the padding before, ``ceil`` after). Resampling is area averaging when shrinking
(MGCA uses ``cv2.INTER_AREA``; PIL's ``BOX`` filter is the same box average) and bilinear when enlarging,
always computed in float32 so that 8- and 16-bit images lose nothing before the final rounding.

``Placement`` records where the original image landed in the padded square, so that boxes and masks given
in original pixel coordinates follow the image exactly.

Errors: anything that cannot be decoded raises ``ImageReadError`` naming the file (converters count it
as a skip when asked to), including compressed DICOMs whose transfer syntax has no installed decoder.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(ValueError):
    """An image file that cannot be read; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def read_image(path: PathLike, *, min_size: int | None = None) -> np.ndarray:
    """Reads a JPEG/PNG (or any format PIL reads) as a 2-D grayscale array.

    Args:
      path: the image file.
      min_size: when given and the file is a JPEG, let the decoder downscale in the DCT domain by a power of
        two while both sides stay >= ``min_size`` (PIL ``draft``). This makes reading a 3000-pixel MIMIC JPEG
        several times faster; converters pass twice the output size so the final area resize still
        averages over real pixels. The returned array is then smaller than the file's pixel grid.

    Returns:
      [height, width] uint8 (8-bit and colour files) or uint16 (16-bit PNG/TIFF).

    Raises:
      ImageReadError: the file is missing, truncated or not an image.
    """
    return _read_pil(path, min_size)[0]


def _read_pil(path: PathLike, min_size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels, (height, width) of the file's full pixel grid); see ``read_image``."""
    from PIL import Image
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    try:
        with Image.open(path) as im:
            full = (im.size[1], im.size[0])
            if min_size and im.format == "JPEG":
                im.draft(im.mode, (min_size, min_size))
            im.load()     # decode now so that truncated files fail here, inside the try
            return _pil_to_gray(im), full
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def _pil_to_gray(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.uint16)
    if im.mode == "I":        # 32-bit integer PNGs are how PIL sometimes opens 16-bit greyscale
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if im.mode == "F":
        raise ValueError("floating-point images are not supported")
    if im.mode != "L":
        im = im.convert("L")  # RGB/RGBA/P/1/LA: ITU-R 601 luma
    return np.asarray(im, dtype=np.uint8)


def read_dicom(path: PathLike, *, out_dtype: type = np.uint8, apply_voi: bool = True,
               frame: int = 0) -> np.ndarray:
    """Reads a DICOM radiograph as a display-ready 2-D grayscale array.

    The standard display pipeline, in order: stored values → Modality LUT (RescaleSlope/Intercept, or a
    Modality LUT Sequence) → VOI (a VOI LUT Sequence if present, else WindowCenter/WindowWidth with the
    VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID; if neither, min-max over the image) → [0, 1] →
    inverted for MONOCHROME1 (so that bone and mediastinum are bright, air dark, as in MONOCHROME2 and
    in the JPEG data sets) → scaled to ``out_dtype``.

    Args:
      path: the .dcm file.
      out_dtype: np.uint8 (0..255), np.uint16 (0..65535) or np.float32 (0..1, for resizing before
        quantising).
      apply_voi: use the file's VOI LUT / window. False: min-max over the image (MGCA's RSNA/SIIM
        preprocessing does this; the RSNA/SIIM files carry no window anyway).
      frame: which frame of a multi-frame file.

    Returns:
      [rows, columns] array of ``out_dtype``.

    Raises:
      ImageReadError: unreadable file, or compressed pixel data with no decoder installed (the message
        names the transfer syntax and the packages that decode it).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ImageReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise ImageReadError(path, "the DICOM file has no pixel data")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError by plugin
        hint = ""
        if syntax is not None and syntax.is_compressed:
            hint = (f" The pixel data is compressed ({syntax.name}). Install a decoder for it, e.g. "
                    "`pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg` or `pip install "
                    "python-gdcm` (JPEG 2000 also decodes with a Pillow built with OpenJPEG).")
        raise ImageReadError(path, f"cannot decode pixel data ({type(e).__name__}: {e}).{hint}") from e

    arr = np.asarray(arr)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:         # colour DICOM (secondary captures): luma, no LUTs apply
        from PIL import Image
        rgb = arr if photometric == "RGB" else _ycbcr_to_rgb(arr)
        x = np.asarray(Image.fromarray(rgb.astype(np.uint8)).convert("L"), np.float32) / 255.0
        return _from_unit(x, out_dtype)
    if arr.ndim != 2:
        raise ImageReadError(path, f"unexpected pixel array shape {arr.shape}")

    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi as voi_lut_sequence   # not `apply_voi`: that is our argument
    values = np.asarray(apply_modality_lut(arr, ds), np.float64)
    x = None
    if apply_voi:
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            # LUT entries are indexed by integer modality values
            mapped = voi_lut_sequence(np.rint(values).astype(np.int64), ds, index=0)
            x = np.asarray(mapped, np.float64) / float(2 ** bits - 1)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            x = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                       str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper())
    if x is None:
        lo, hi = float(values.min()), float(values.max())
        x = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return _from_unit(x, out_dtype)


def _first(v) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default display."""
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2 / C.11.2.1.3) to [0, 1].

    Args:
      values: modality values (after rescale).
      center, width: WindowCenter, WindowWidth.
      function: LINEAR (the default of the standard), LINEAR_EXACT or SIGMOID.
    """
    v = np.asarray(values, np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (v - center) / max(width, 1e-6)))
    if function == "LINEAR":                  # the standard's half-pixel offsets
        center, width = center - 0.5, max(width - 1.0, 1e-6)
    elif function != "LINEAR_EXACT":
        raise ValueError(f"unsupported VOILUTFunction {function!r}")
    return np.clip((v - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)


def _ycbcr_to_rgb(arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import convert_color_space
    return convert_color_space(arr, "YBR_FULL", "RGB")


def read_any(path: PathLike, *, out_dtype: type = np.uint8, min_size: int | None = None) -> np.ndarray:
    """Reads a DICOM (by suffix) or any PIL-readable image as a 2-D grayscale array."""
    if os.fspath(path).lower().endswith(DICOM_SUFFIXES):
        return read_dicom(path, out_dtype=out_dtype)
    return read_image(path, min_size=min_size)


# ---------------------------------------------------------------------------------------------------------
# Dtype helpers
# ---------------------------------------------------------------------------------------------------------

def _from_unit(x: np.ndarray, dtype) -> np.ndarray:
    """[0, 1] floats → dtype (rounded for integers)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"out_dtype must be uint8, uint16 or float32, got {dtype}")
    top = np.iinfo(dtype).max
    return np.clip(np.rint(x * top), 0, top).astype(dtype)


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Values already in ``dtype``'s range (e.g. a resized uint8 image held as float) → ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Resize and pad
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an [in_height, in_width] image landed in the [size, size] output.

    The image was resized to [height, width] and its top-left corner put at (top, left).
    """
    in_height: int
    in_width: int
    height: int
    width: int
    top: int
    left: int
    size: int

    @property
    def scale_y(self) -> float:
        return self.height / self.in_height

    @property
    def scale_x(self) -> float:
        return self.width / self.in_width

    def normalise_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes in input pixels (ymin, xmin, ymax, xmax) [n, 4] → normalised in the output, [n, 4]."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        out = np.stack([(b[:, 0] * self.scale_y + self.top) / self.size,
                        (b[:, 1] * self.scale_x + self.left) / self.size,
                        (b[:, 2] * self.scale_y + self.top) / self.size,
                        (b[:, 3] * self.scale_x + self.left) / self.size], axis=1)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def place_mask(self, mask: np.ndarray) -> np.ndarray:
        """A binary mask at the input size [in_height, in_width] → uint8 {0, 255} mask [size, size].

        Area-resized then thresholded at one half, so thin regions survive shrinking as well as they can.
        """
        m = np.asarray(mask)
        if m.shape != (self.in_height, self.in_width):
            raise ValueError(f"mask shape {m.shape} differs from the image's "
                             f"{(self.in_height, self.in_width)}")
        small = _resize_float((m > 0).astype(np.float32), self.height, self.width)
        out = np.zeros((self.size, self.size), np.uint8)
        out[self.top:self.top + self.height, self.left:self.left + self.width] = (small >= 0.5) * 255
        return out


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """A normalised box (ymin, xmin, ymax, xmax) rasterised as a uint8 {0, 255} [size, size] mask.

    A pixel is inside when its centre is (half-open: ymin <= centre < ymax); every non-degenerate box
    covers at least one pixel.
    """
    y0, x0, y1, x1 = (float(v) * size for v in np.asarray(box).reshape(4))
    # row i's centre is i + 0.5, so rows ceil(y0 - 0.5) .. ceil(y1 - 0.5) - 1 are inside
    r0, r1 = int(np.ceil(y0 - 0.5)), int(np.ceil(y1 - 0.5))
    c0, c1 = int(np.ceil(x0 - 0.5)), int(np.ceil(x1 - 0.5))
    if y1 > y0 and r1 <= r0:
        r1 = r0 + 1
    if x1 > x0 and c1 <= c0:
        c1 = c0 + 1
    out = np.zeros((size, size), np.uint8)
    out[max(r0, 0):min(r1, size), max(c0, 0):min(c1, size)] = 255
    return out


def _resize_float(x: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image
    if x.shape == (height, width):
        return x.astype(np.float32)
    shrink = height <= x.shape[0] and width <= x.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((width, height), resample))


def fit_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output [height, width] with the longer side == size, the shorter truncated as MGCA does (>= 1)."""
    if height >= width:
        return size, max(1, int(width * (size / height)))
    return max(1, int(height * (size / width))), size


def resize_and_pad(image: np.ndarray, size: int, *,
                   source_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Placement]:
    """Resizes so the longer side is ``size`` (aspect kept), then zero-pads to [size, size], centred.

    Args:
      image: [height, width] uint8/uint16/float32.
      size: output side.
      source_shape: (height, width) of the pixel grid the image stands for, when it was decoded smaller
        (JPEG draft); the geometry (and so box/mask mapping) is computed from it. Default: image.shape.

    Returns:
      ([size, size] array of the input dtype, Placement).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    h, w = source_shape if source_shape is not None else image.shape
    nh, nw = fit_size(h, w, size)
    resized = to_dtype(_resize_float(image.astype(np.float32), nh, nw), image.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((size, size), image.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out, Placement(h, w, nh, nw, top, left, size)


# ---------------------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------------------

def encode_png(image: np.ndarray) -> bytes:
    """[h, w] uint8 / bool (as 0/255) / uint16 (16-bit greyscale) or [h, w, 3] uint8 (RGB) -> PNG bytes.

    Written with zlib rather than an image library, so the bytes depend only on the pixels (and zlib) and a
    prepared data set is byte-reproducible. Every row uses PNG's "Sub" filter (each byte minus the byte of the
    previous pixel, mod 256), which suits smooth radiographs and flat masks alike.
    """
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2 and a.dtype in (np.uint8, np.uint16):
        depth, color, channels = 8 * a.itemsize, 0, 1       # greyscale
    elif a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
        depth, color, channels = 8, 2, 3                    # RGB
    else:
        raise ValueError(f"encode_png takes [h, w] uint8/bool/uint16 or [h, w, 3] uint8, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    bpp = channels * a.itemsize                             # bytes per pixel
    rows = np.ascontiguousarray(a.astype(a.dtype.newbyteorder(">"))).view(np.uint8).reshape(h, w * bpp)
    raw = np.empty((h, w * bpp + 1), np.uint8)
    raw[:, 0] = 1                                           # filter type Sub
    raw[:, 1:bpp + 1] = rows[:, :bpp]
    raw[:, bpp + 1:] = rows[:, bpp:] - rows[:, :-bpp]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)   # no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → numpy array (uint8 or uint16), as written by ``encode_png``."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im)


def load_for_dataset(path: PathLike, size: int, *, bit_depth: int = 8) -> tuple[np.ndarray, Placement]:
    """Reads any supported file and resizes/pads it to [size, size] (the converters' one call).

    DICOMs are read as floats and quantised after resizing to ``bit_depth`` (8 or 16) bits; JPEG/PNG keep
    their own depth (MIMIC/CheXpert JPEGs are 8-bit).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if os.fspath(path).lower().endswith(DICOM_SUFFIXES):
        x = read_dicom(path, out_dtype=np.float32)
        out, placement = resize_and_pad(x, size)
        return _from_unit(out, np.uint8 if bit_depth == 8 else np.uint16), placement
    pixels, full = _read_pil(path, 2 * size)
    return resize_and_pad(pixels, size, source_shape=full)
