"""Record fields as tf ops: image headers (no decoding), the checks every parsed record passes, image decoding.

Every function takes the ``tensorflow`` module as its first argument (imported by the caller, TF stays lazy)
and builds ops usable inside tf.data maps and eagerly alike.
"""
from __future__ import annotations

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# PNG IHDR colour type -> channels (0 grey, 2 RGB, 3 palette (RGB), 4 grey+alpha, 6 RGBA; others invalid).
_PNG_CHANNELS = (1, -1, 3, 3, 2, -1, 4)
ALLOWED_CHANNELS = (1, 3)          # the schema: grayscale or RGB


def image_header(tf, image_bytes):
    """[height, width, channels] int32 read from a PNG/JPEG header (no decoding); raises on anything else."""
    is_png = tf.equal(tf.strings.substr(image_bytes, 0, 8), PNG_MAGIC)
    is_jpeg = tf.io.is_jpeg(image_bytes)
    ok = tf.debugging.Assert(is_png | is_jpeg, ["image is neither PNG nor JPEG"])

    def png():
        head = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 10), tf.uint8), tf.int32)
        tf.debugging.assert_equal(tf.size(head), 10, message="PNG header is truncated")
        w = head[0] * 2 ** 24 + head[1] * 2 ** 16 + head[2] * 2 ** 8 + head[3]
        h = head[4] * 2 ** 24 + head[5] * 2 ** 16 + head[6] * 2 ** 8 + head[7]
        color = tf.minimum(head[9], len(_PNG_CHANNELS) - 1)
        return tf.stack([h, w, tf.gather(tf.constant(_PNG_CHANNELS), color)])

    with tf.control_dependencies([ok]):
        return tf.cond(is_png, png, lambda: tf.io.extract_jpeg_shape(image_bytes))


def check_image_shape(tf, hwc, resize: int):
    """Assertions (ops) that an image of header shape ``hwc`` has 1 or 3 channels and survives the resize."""
    h, w, c = hwc[0], hwc[1], hwc[2]
    channels_ok = tf.reduce_any(tf.equal(c, tf.constant(ALLOWED_CHANNELS)))
    short_side = tf.round(tf.cast(tf.minimum(h, w), tf.float32) * resize / tf.cast(tf.maximum(tf.maximum(h, w), 1),
                                                                                   tf.float32))
    return [tf.debugging.Assert(channels_ok, ["image has", c, "channels; the schema allows 1 (grayscale) or 3 (RGB)"]),
            tf.debugging.Assert((h >= 1) & (w >= 1) & (short_side >= 1),
                                ["image of shape", h, "x", w, f"is degenerate (its short side vanishes when the long "
                                 f"side is resized to {resize})"])]


def check_report(tf, report, *, require_text: bool):
    """Assertions that ``report`` is valid UTF-8 and (``require_text``) not empty or blank."""
    checks = [tf.debugging.Assert(tf.size(tf.strings.unicode_decode(report, "UTF-8", errors="strict")) >= 0,
                                  ["report is not valid UTF-8"])]
    if require_text:
        checks.append(tf.debugging.Assert(tf.strings.length(tf.strings.strip(report)) > 0, ["report is empty"]))
    return checks


def decode_image(tf, image_bytes, *, resize: int, crop: int, channels: int, train: bool, seed, random_flip: bool):
    """PNG/JPEG bytes -> [crop, crop, channels] float32 in [-1, 1].

    Resize so the longer side is ``resize`` (aspect kept), zero-pad to a square (MGCA), then random crop
    (train, stateless seed) or center crop (eval).
    """
    img = tf.io.decode_image(image_bytes, channels=1, expand_animations=False, dtype=tf.float32)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    scale = resize / tf.reduce_max(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    # An image stored at the training resolution (the converters' --image_size, 256 = the paper's data.resize)
    # needs no resampling: the area resize is then the identity, bit for bit, and was ~1/4 of the CPU time of
    # the whole pipeline (docs/benchmarks.md), so it is skipped.
    img = tf.cond(tf.reduce_all(tf.equal(new, tf.shape(img)[:2])), lambda: img,
                  lambda: tf.image.resize(img, new, method="area", antialias=True))
    img = tf.image.pad_to_bounding_box(img, (resize - new[0]) // 2, (resize - new[1]) // 2, resize, resize)
    if train:
        img = tf.image.stateless_random_crop(img, [crop, crop, 1], seed=seed)
        if random_flip:
            img = tf.image.stateless_random_flip_left_right(img, seed=seed + 1)
    else:
        off = (resize - crop) // 2
        img = img[off:off + crop, off:off + crop]
    img = (tf.clip_by_value(img, 0.0, 1.0) - 0.5) / 0.5
    if channels != 1:
        img = tf.tile(img, [1, 1, channels])
    img.set_shape([crop, crop, channels])
    return img
