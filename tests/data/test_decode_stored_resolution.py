"""decode.decode_image skips the resize of an image stored at the training resolution (the converters'
--image_size = data.resize): the result is identical to resizing it, and other sizes are still resized."""
import numpy as np
import pytest

from medvlp_jax import env
from medvlp_jax.data import decode

tf = env.import_tensorflow_quietly()


def _png(h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 1), dtype=np.uint8)
    return tf.io.encode_png(img), img


def _reference(data, img, resize, crop):
    """The pipeline's eval path with the resize always applied (what decode_image did before)."""
    x = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.float32)
    shape = np.array(img.shape[:2], np.float64)
    new = np.round(shape * resize / shape.max()).astype(np.int32)
    x = tf.image.resize(x, new, method="area", antialias=True)
    x = tf.image.pad_to_bounding_box(x, (resize - new[0]) // 2, (resize - new[1]) // 2, resize, resize)
    off = (resize - crop) // 2
    x = x[off:off + crop, off:off + crop]
    return ((tf.clip_by_value(x, 0.0, 1.0) - 0.5) / 0.5).numpy()


@pytest.mark.parametrize("h,w", [(64, 64), (64, 50), (40, 64), (100, 80), (32, 30)])
def test_stored_at_resize_equals_resized(h, w):
    data, img = _png(h, w)
    got = decode.decode_image(tf, data, resize=64, crop=56, channels=1, train=False, seed=tf.constant([0, 0]),
                                random_flip=False).numpy()
    np.testing.assert_array_equal(got, _reference(data, img, 64, 56))


def test_training_crop_at_stored_resolution_is_a_window_of_the_image():
    data, img = _png(64, 64, seed=3)
    got = decode.decode_image(tf, data, resize=64, crop=48, channels=3, train=True, seed=tf.constant([5, 7]),
                                random_flip=False).numpy()
    full = ((tf.io.decode_image(data, channels=1, dtype=tf.float32).numpy()[..., 0]) - 0.5) / 0.5
    windows = [(i, j) for i in range(17) for j in range(17)
               if np.allclose(full[i:i + 48, j:j + 48], got[..., 0], atol=1e-6)]
    assert len(windows) == 1 and got.shape == (48, 48, 3)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
