"""ResNet (torchvision v1.5 bottleneck layout) image tower, as GLoRIA and MGCA use it (methods.md 1.2).

The 224 crop is optionally upsampled bilinearly (``align_corners=True``, as ``nn.Upsample`` in GLoRIA/MGCA)
to ``resize_to`` (299) before the stem; local features are ``layer3`` (19x19x1024 at 299), the global
feature is ``layer4`` average-pooled (2048).

BatchNorm uses the ``batch_stats`` collection: in training apply with ``mutable=["batch_stats"]``.
Momentum 0.9 / eps 1e-5 are torch's BatchNorm2d defaults (torch momentum 0.1 == flax 0.9).

Parameter tree (torchvision names, ``params`` and ``batch_stats`` alike)::

    conv1/kernel [7, 7, c, w0]            bn1/{scale, bias | mean, var}
    layer{s}_{j}/{conv1, bn1, conv2, bn2, conv3, bn3[, downsample_conv, downsample_bn]}

with s = 1..4 (stage) and j = 0..stage_sizes[s-1]-1 (block), w0 = base_width.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

EXPANSION = 4   # bottleneck output width = 4 x its inner width
LOCAL_STAGES = {"layer2": 2, "layer3": 4}   # local stage -> its inner width in units of base_width
STAGE_STRIDES = {"layer2": 8, "layer3": 16}


def grid_centres(image_side: int, stride: int, resize_to: Optional[int] = None) -> tuple[float, float]:
    """(scale, offset): cell i of a stride-``stride`` stage is centred at the fraction scale * i + offset of the image.

    Every torchvision ResNet layer with stride 2 (7x7 conv pad 3, 3x3 max pool pad 1, 3x3 conv pad 1, 1x1
    conv pad 0) centres output j on input pixel 2j, so cell i sits on pixel ``stride * i`` of the network's
    input (pixel k spans [k, k + 1)): half a cell up-left of the half-pixel convention (i + 0.5) * stride.
    With ``resize_to`` (align_corners upsampling of an ``image_side`` image), pixel k of the resized input
    lies on pixel k * (image_side - 1) / (resize_to - 1) of the image.
    """
    per_pixel = 1.0 if not resize_to else (image_side - 1) / (resize_to - 1)
    return stride * per_pixel / image_side, 0.5 / image_side


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with align_corners=True (corner pixels map to corners)."""
    if n_out == 1:
        src = np.zeros((1,))
    else:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    lo = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m.astype(np.float32)


def resize_bilinear_align_corners(images: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize with ``align_corners=True`` (torch ``F.interpolate`` semantics).

    ``jax.image.resize`` uses half-pixel centres (align_corners=False), which is not what the peers do.
    Separable: two small matrix products, exact and sharding-friendly.

    Args:
      images: [b, h, w, c].
      size: (out_h, out_w).

    Returns:
      [b, out_h, out_w, c] in the input dtype.
    """
    _, h, w, _ = images.shape
    if (h, w) == tuple(size):
        return images
    mh = jnp.asarray(_interp_matrix(h, size[0]))
    mw = jnp.asarray(_interp_matrix(w, size[1]))
    x = jnp.einsum("oh,bhwc->bowc", mh, images.astype(jnp.float32), precision="highest")
    x = jnp.einsum("pw,bowc->bopc", mw, x, precision="highest")
    return x.astype(images.dtype)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 (x4), projection shortcut if needed."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), strides=(s, s), padding=[(p, p), (p, p)],
                                                use_bias=False, dtype=self.dtype, name=name)
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                         dtype=self.dtype, use_fast_variance=False, name=name)
        out_ch = self.planes * EXPANSION
        y = nn.relu(norm("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x)))
        y = nn.relu(norm("bn2")(conv(self.planes, 3, self.stride, 1, "conv2")(y)))
        y = norm("bn3")(conv(out_ch, 1, 1, 0, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = norm("downsample_bn")(conv(out_ch, 1, self.stride, 0, "downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet image tower returning global (layer4 pooled) and local (layer3 grid) features.

    Attributes:
      stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50, (1, 1, 1, 1) a test-sized net.
      base_width: stem width and stage-1 inner width (64 for ResNet-50); stage s has inner width
        base_width * 2**(s-1) and output width 4x that.
      resize_to: if set, images are bilinearly upsampled (align_corners=True) to this square side first
        (299 in GLoRIA/MGCA); None keeps the input size.
      dtype: compute dtype (params and BN statistics stay float32).
      remat: recompute each bottleneck in the backward pass.
      local_stage: the stage whose grid is the local features: "layer3" (the papers: stride 16, 19x19 at 299)
        or "layer2" (stride 8: a grid twice as fine, for small images whose findings span a few pixels).
    """
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    base_width: int = 64
    resize_to: Optional[int] = None
    dtype: Dtype = jnp.float32
    remat: bool = False
    local_stage: str = "layer3"

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(global width = layer4 channels, local width = ``local_stage`` channels); (2048, 1024) for ResNet-50."""
        return self.base_width * 8 * EXPANSION, self.base_width * LOCAL_STAGES[self.local_stage] * EXPANSION

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """Encodes images.

        Args:
          images: [b, h, w, c] float.
          train: BatchNorm uses batch statistics and updates ``batch_stats`` when True.

        Returns:
          dict with
            cls: [b, 4 * 8 * base_width] global average pool of layer4.
            patches: [b, gh * gw, c_local] the ``local_stage`` feature map flattened row-major (layer3:
              c_local = 4 * 4 * base_width; layer2: 4 * 2 * base_width).
            attn: None (no attention in a CNN).
            grid: (gh, gw) local stage's spatial size (layer3: 19x19 for 299 inputs).
            centres: ((scale_y, offset_y), (scale_x, offset_x)) of the grid cells (``grid_centres``).
            stages: {"layer1".."layer4": [b, h_s, w_s, c_s]} every stage output (detection/segmentation).
        """
        if len(self.stage_sizes) != 4:
            raise ValueError(f"ResNet needs 4 stages, got stage_sizes={self.stage_sizes}")
        if self.local_stage not in LOCAL_STAGES:
            raise ValueError(f"ResNet local_stage must be one of {sorted(LOCAL_STAGES)}, got {self.local_stage!r}")
        x = images
        stride = STAGE_STRIDES[self.local_stage]
        centres = (grid_centres(images.shape[1], stride, self.resize_to),
                   grid_centres(images.shape[2], stride, self.resize_to))
        if self.resize_to is not None:
            x = resize_bilinear_align_corners(x, (self.resize_to, self.resize_to))
        x = x.astype(self.dtype)
        x = nn.Conv(self.base_width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                    dtype=self.dtype, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         use_fast_variance=False, name="bn1")(x)
        x = nn.relu(x)
        # reduce_window pads with -inf, which is what torch's MaxPool2d(3, 2, padding=1) does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])

        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
        stages = {}
        for s, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                stride = 2 if (s > 0 and j == 0) else 1
                x = block_cls(self.base_width * 2 ** s, stride, self.dtype, name=f"layer{s + 1}_{j}")(x, train)
            stages[f"layer{s + 1}"] = x

        local = stages[self.local_stage]
        b, gh, gw, c3 = local.shape
        return dict(cls=stages["layer4"].astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype),
                    patches=local.reshape(b, gh * gw, c3), attn=None, grid=(gh, gw), centres=centres, stages=stages)
