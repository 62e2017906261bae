"""Synthetic frontal (PA) chest radiographs rendered from a list of findings, with their ground truth.

The demo data set pairs real report text with an image drawn from that report's tags, so the words that
name a finding and the region that shows it truly correspond. This module draws such an image:

    rendering = render([Finding("opacity", side="right", zone="upper")], seed=(0, 17), size=128)
    rendering.image   # [H, W] uint8, bright = dense (bone, heart, fluid), dark = air
    rendering.names   # [n] one name per rendered finding ("opacity")
    rendering.boxes   # [n, 4] (ymin, xmin, ymax, xmax) normalised to [0, 1]
    rendering.masks   # [n, H, W] bool

Coordinates are normalised image coordinates, y down and x right. The film is PA, so the patient's right
lung is on the image's LEFT (small x). Sides in ``Finding`` are always the patient's.

The image is an attenuation sum: body soft tissue, minus the air of two lung fields, plus heart,
mediastinum, abdomen below the diaphragm domes, bones (ribs, clavicles, spine, humeral heads), vessel
markings, the findings, and metal; then blurred, noised and windowed. Anatomy is random per image (size,
position, inspiration depth, heart size, rib spacing, contrast, noise) from a seeded ``numpy`` generator,
so the same findings never render the same image twice unless the seed repeats. Everything is vectorised
over the pixel grid (a 128x128 image takes a few milliseconds on one core).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import numpy as np

SIDES = ("right", "left", "bilateral")
ZONES = ("apex", "upper", "middle", "lower", "base", "lingula", "hilum", "retrocardiac", "abdomen")
SEVERITIES = ("borderline", "mild", "small", "moderate", "large", "severe")
DEVICES = ("catheter", "pacemaker", "sternotomy", "clips", "tube", "stent")

# What each kind draws. Regional kinds are drawn in a lung zone, once per side when bilateral.
KINDS = (
    "opacity",             # patchy hazy density in the named zone
    "consolidation",       # dense homogeneous lobar density with air bronchograms
    "nodule",              # small round blob (several when ``multiple``)
    "mass",                # large lobulated blob
    "granuloma",           # tiny, very bright (calcified) dots
    "effusion",            # fluid at the named base with a meniscus, blunted costophrenic angle
    "atelectasis",         # a dense plate-like band
    "pneumothorax",        # pleural line, no lung markings between it and the chest wall
    "edema",               # bilateral perihilar haze and Kerley lines
    "cardiomegaly",        # a wider heart (cardiothoracic ratio by severity)
    "hyperinflation",      # taller lungs, flat low diaphragm, narrow heart, more lucent
    "hypoinflation",       # short lungs, high domes, crowded markings
    "elevated_diaphragm",  # the named hemidiaphragm higher
    "tortuous_aorta",      # bigger, more lateral aortic knob and a bulging descending aorta
    "spine_degeneration",  # osteophytes (bright spurs) on thoracic vertebrae
    "scoliosis",           # laterally curved spine
    "device",              # metal: ``device`` in DEVICES picks catheter/pacemaker/wires/clips/tube/stent
)
_REGIONAL = ("opacity", "consolidation", "nodule", "mass", "granuloma", "effusion", "atelectasis",
             "pneumothorax")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing to draw.

    Attributes:
      kind: one of ``KINDS``.
      side: the patient's "right", "left", "bilateral", or None (chosen at random where a side is needed).
      zone: one of ``ZONES`` or None (anywhere in the lung); "abdomen" places devices only.
      severity: one of ``SEVERITIES`` or None (a typical size).
      multiple: draw several lesions (nodules, granulomas).
      diffuse: spread over both lungs (interstitial opacity).
      device: for kind "device", one of ``DEVICES`` (None: catheter).
      name: the name to report for this finding (defaults to ``kind``).
    """
    kind: str
    side: Optional[str] = None
    zone: Optional[str] = None
    severity: Optional[str] = None
    multiple: bool = False
    diffuse: bool = False
    device: Optional[str] = None
    name: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; known: {KINDS}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES} or None, got {self.side!r}")
        if self.zone is not None and self.zone not in ZONES:
            raise ValueError(f"zone must be one of {ZONES} or None, got {self.zone!r}")
        if self.severity is not None and self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES} or None, got {self.severity!r}")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} or None, got {self.device!r}")


@dataclasses.dataclass
class Rendering:
    """A rendered radiograph and the ground truth of each finding drawn on it.

    Attributes:
      image: [H, W] uint8.
      names: [n] finding names (``Finding.name`` or its kind).
      boxes: [n, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1], the extent of each mask.
      masks: [n, H, W] bool.
      sources: [n] the ``Finding`` each entry came from (a bilateral finding gives one entry per side).
      anatomy: [H, W] bool masks "lung_right", "lung_left", "heart" (patient's sides).
    """
    image: np.ndarray
    names: list
    boxes: np.ndarray
    masks: np.ndarray
    sources: list
    anatomy: dict


# ----------------------------------------------------------------------------------------------------
# Small vectorised drawing tools. Scalars are cast to Python floats so float32 arrays stay float32.

_F32 = np.float32


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, normalised: ([H, W] y, [H, W] x)."""
    y = (np.arange(h, dtype=_F32) + 0.5) / h
    x = (np.arange(w, dtype=_F32) + 0.5) / w
    yy, xx = np.meshgrid(y, x, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, sigma in pixels, edges replicated; returns float32."""
    img = np.asarray(img, _F32)
    if sigma <= 0.05:
        return img
    r = max(1, int(3.0 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = [float(v) for v in k / k.sum()]
    h, w = img.shape
    p = np.empty((h + 2 * r, w), _F32)
    p[r:r + h], p[:r], p[r + h:] = img, img[:1], img[-1:]
    out = k[0] * p[0:h]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[i:i + h]
    p = np.empty((h, w + 2 * r), _F32)
    p[:, r:r + w], p[:, :r], p[:, r + w:] = out, out[:, :1], out[:, -1:]
    out = k[0] * p[:, 0:w]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[:, i:i + w]
    return out


def _upsample(small: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a coarse [h0, w0] field to [h, w] (cheap low-frequency noise)."""
    h0, w0 = small.shape
    ys = np.linspace(0, h0 - 1, h, dtype=_F32)
    xs = np.linspace(0, w0 - 1, w, dtype=_F32)
    y0 = np.minimum(ys.astype(int), h0 - 2)
    x0 = np.minimum(xs.astype(int), w0 - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x0 + 1] * fx
    bot = small[y0 + 1][:, x0] * (1 - fx) + small[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(_F32)


def _catmull_rom(points: np.ndarray, per_segment: int = 8) -> np.ndarray:
    """Closed Catmull-Rom spline through [k, 2] points -> [k * per_segment, 2] points."""
    p = np.asarray(points, _F32)
    p0, p1, p2, p3 = np.roll(p, 1, 0), p, np.roll(p, -1, 0), np.roll(p, -2, 0)
    t = (np.arange(per_segment, dtype=_F32) / per_segment)[None, :, None]
    out = 0.5 * (2 * p1[:, None] + (p2 - p0)[:, None] * t
                 + (2 * p0 - 5 * p1 + 4 * p2 - p3)[:, None] * t ** 2
                 + (3 * p1 - p0 - 3 * p2 + p3)[:, None] * t ** 3)
    return out.reshape(-1, 2)


def _fill_polygon(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Even-odd scanline fill of a closed polygon [k, 2] of normalised (y, x) -> [H, W] bool."""
    py, px = poly[:, 0] * h, poly[:, 1] * w
    qy, qx = np.roll(py, -1), np.roll(px, -1)
    yc = np.arange(h, dtype=_F32)[:, None] + 0.5                           # [H, 1]
    crosses = (py[None] <= yc) != (qy[None] <= yc)                         # [H, E]
    slope = (qx - px) / np.where(qy == py, 1.0, qy - py)
    rows, edges = np.nonzero(crosses)
    xc = px[edges] + (yc[rows, 0] - py[edges]) * slope[edges]
    cols = np.clip(np.ceil(xc - 0.5), 0, w).astype(np.int64)
    counts = np.bincount(rows * (w + 1) + cols, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(counts[:, :w], axis=1) % 2) == 1


def _splat(ys: np.ndarray, xs: np.ndarray, weights, h: int, w: int) -> np.ndarray:
    """Adds weights at the pixels of normalised points (rasterises densely sampled curves)."""
    iy = np.clip((np.asarray(ys) * h).astype(np.int64), 0, h - 1)
    ix = np.clip((np.asarray(xs) * w).astype(np.int64), 0, w - 1)
    wts = np.broadcast_to(np.asarray(weights, np.float64), iy.shape).ravel()
    return np.bincount((iy * w + ix).ravel(), weights=wts, minlength=h * w).reshape(h, w).astype(_F32)


def _resample(pts: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples a polyline [k, 2] (normalised y, x) at about two points per pixel of its length."""
    pts = np.asarray(pts, _F32)
    step = np.hypot(np.diff(pts[:, 0]) * h, np.diff(pts[:, 1]) * w)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    s = np.linspace(0.0, arc[-1], max(2, int(2 * arc[-1]) + 1))
    return np.interp(s, arc, pts[:, 0]), np.interp(s, arc, pts[:, 1])


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    """Quadratic Bezier from p0 via control p1 to p2 -> [n, 2]."""
    t = np.linspace(0, 1, n, dtype=_F32)[:, None]
    p0, p1, p2 = (np.asarray(p, _F32) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _line(pts: np.ndarray, width_px: float, h: int, w: int) -> np.ndarray:
    """A soft line about ``width_px`` pixels wide along a polyline, [H, W] peaking near 1."""
    ys, xs = _resample(pts, h, w)
    line = _blur(np.minimum(_splat(ys, xs, 1.0, h, w), 1.0), max(0.35, 0.5 * width_px))
    return np.minimum(line * (1.6 / max(float(line.max()), 1e-6)), 1.0)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _rotated(yy, xx, cy, cx, angle):
    """Coordinates relative to (cy, cx), rotated by ``angle`` radians."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dy, dx = yy - float(cy), xx - float(cx)
    return dy * c - dx * s, dy * s + dx * c


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) in [0, 1] of a [H, W] mask (pixel edges); zeros if empty."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, _F32)
    return np.array([rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w], _F32)


# ----------------------------------------------------------------------------------------------------
# Anatomy.

# Cardiothoracic ratio by severity (normal films draw 0.40-0.47).
_CTR = {"borderline": 0.52, "mild": 0.56, "small": 0.56, "moderate": 0.61, "large": 0.65, "severe": 0.67}
_SMALL = ("borderline", "mild", "small")


@dataclasses.dataclass
class _Anatomy:
    cx: float
    half_w: float           # half the inner ribcage width near the domes
    apex: float             # lung apex y
    dome: dict              # patient's side -> dome top y
    dome_h: float           # depth of the costophrenic recess below the dome top
    heart: np.ndarray       # [H, W] bool
    heart_c: tuple          # (y, x)
    hila: dict              # side -> (y, x)
    lungs: dict             # side -> [H, W] bool
    lung_polys: dict        # side -> outline [k, 2] before the dome/heart/mediastinum cuts
    below: np.ndarray       # [H, W] bool, below the diaphragm
    mediastinum: np.ndarray  # [H, W] bool
    spine_x: np.ndarray     # [H] spine centre x per row
    knob: tuple             # aortic knob (y, x, r)


def _sides_of(side: Optional[str], default: str) -> tuple[str, ...]:
    return ("right", "left") if side == "bilateral" else (side or default,)


def _dome_curve(a_cx, half_w, dome, dome_h, side, xx):
    """y of one hemidiaphragm at image x (patient's ``side``): a dome peaking medially of centre."""
    u = (a_cx - xx) if side == "right" else (xx - a_cx)          # lateral distance from the midline
    u = np.minimum(u, half_w)                                    # flat beyond the chest wall
    peak = 0.45 * half_w
    return dome + dome_h * ((u - peak) / (half_w - peak)) ** 2


def _anatomy(rng: np.random.Generator, findings: Sequence[Finding], h: int, w: int) -> _Anatomy:
    yy, xx = _grid(h, w)
    kinds = {f.kind for f in findings}
    cx = 0.5 + rng.normal(0, 0.012)
    half_w = 0.36 * rng.uniform(0.93, 1.05)
    apex = rng.uniform(0.09, 0.14)
    dome_r = rng.uniform(0.62, 0.67)
    dome = {"right": dome_r, "left": dome_r + rng.uniform(0.01, 0.035)}
    dome_h = rng.uniform(0.08, 0.11)
    ctr = rng.uniform(0.40, 0.47)
    if "hyperinflation" in kinds:
        deeper = rng.uniform(0.09, 0.12)
        dome = {s: v + deeper for s, v in dome.items()}
        dome_h *= rng.uniform(0.3, 0.45)   # flat domes
        half_w *= 1.05
        apex -= 0.01
        ctr -= 0.06                        # long narrow heart
    if "hypoinflation" in kinds:
        higher = rng.uniform(0.07, 0.10)
        dome = {s: v - higher for s, v in dome.items()}
        dome_h *= 1.1
        ctr = min(ctr + 0.03, 0.49)        # crowded, broader-looking heart, still not enlarged
    for f in findings:
        if f.kind == "elevated_diaphragm":
            lift = 0.05 if f.severity in _SMALL else rng.uniform(0.07, 0.11)
            for s in _sides_of(f.side, "right"):
                dome[s] -= lift
        if f.kind == "cardiomegaly":
            ctr = _CTR.get(f.severity, 0.58) + rng.normal(0, 0.01)

    # Heart: a tilted ellipse resting on (and partly hidden by) the left hemidiaphragm, about two
    # thirds of it left of the midline (image right); its widest extent is ``ctr`` times the
    # thoracic width.
    width = ctr * 2 * half_w
    ah = rng.uniform(0.12, 0.145)
    hy = dome["left"] - 0.5 * ah
    tilt = np.deg2rad(rng.uniform(-30, -20))
    c, s = float(np.cos(tilt)), float(np.sin(tilt))
    # A tilted ellipse's half-width is sqrt(aw^2 c^2 + ah^2 s^2): solve it for aw.
    aw = float(np.sqrt(max((0.5 * width) ** 2 - (ah * s) ** 2, 0.05 ** 2)) / c)
    hx = cx - 0.36 * width + 0.5 * width
    ry, rx = _rotated(yy, xx, hy, hx, tilt)
    heart = (ry / ah) ** 2 + (rx / aw) ** 2 <= 1.0

    # Spine centre per row; scoliosis bends it toward the named side.
    rows = (np.arange(h, dtype=_F32) + 0.5) / h
    spine_x = np.full(h, cx, _F32)
    for f in findings:
        if f.kind == "scoliosis":
            amp = {"mild": 0.02, "moderate": 0.035, "severe": 0.055}.get(f.severity, 0.03)
            sign = {"right": -1.0, "left": 1.0}.get(f.side, float(rng.choice([-1.0, 1.0])))
            spine_x = spine_x + _F32(sign * amp) * np.sin(np.pi * np.clip((rows - 0.1) / 0.75, 0, 1))

    knob_r = rng.uniform(0.026, 0.034)
    knob = (apex + rng.uniform(0.15, 0.18), cx + rng.uniform(0.045, 0.058), knob_r)
    if "tortuous_aorta" in kinds:
        knob = (knob[0] - 0.01, knob[1] + rng.uniform(0.025, 0.035), knob_r * 1.3)
    ky, kx, kr = knob
    med_half = rng.uniform(0.045, 0.055) + 0.02 * _smoothstep((yy - apex - 0.15) / 0.25)
    mediastinum = (np.abs(xx - cx) < med_half) & (yy < hy)
    mediastinum |= (yy - ky) ** 2 + (xx - kx) ** 2 < kr * kr

    # Lungs: a jittered outline (the patient's right lung on the image's left, the left mirrored),
    # cut by the dome, the heart and the mediastinum.
    below = np.zeros((h, w), bool)
    lungs, polys, hila = {}, {}, {}
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        d = dome[side]
        span = d - apex
        ctrl = np.array([                      # (y, u): u = lateral distance from the midline
            (apex + 0.16 * span, 0.12 * half_w),
            (apex + 0.03 * span, 0.24 * half_w),
            (apex, 0.40 * half_w),
            (apex + 0.03 * span, 0.56 * half_w),
            (apex + 0.13 * span, 0.74 * half_w),
            (apex + 0.32 * span, 0.89 * half_w),
            (apex + 0.60 * span, 0.97 * half_w),
            (d + 0.4 * dome_h, 1.0 * half_w),
            (d + dome_h + 0.012, 0.985 * half_w),  # the costophrenic recess
            (d + 0.25, 0.6 * half_w),
            (d + 0.25, 0.06),
            (apex + 0.55 * span, 0.06),
        ], _F32)
        ctrl += rng.normal(0, 0.005, ctrl.shape).astype(_F32)
        outline = _catmull_rom(ctrl, 6)
        poly = np.stack([outline[:, 0], cx + sgn * outline[:, 1]], axis=1)
        dome_y = _dome_curve(cx, half_w, d, dome_h, side, xx)
        side_half = (xx < cx) if side == "right" else (xx >= cx)
        below |= side_half & (yy > dome_y) & (np.abs(xx - cx) < half_w + 0.015)
        lungs[side] = _fill_polygon(poly, h, w) & (yy < dome_y) & ~heart & ~mediastinum
        polys[side] = poly
        hila[side] = (apex + 0.47 * span + rng.normal(0, 0.01), cx + sgn * rng.uniform(0.10, 0.13))
    return _Anatomy(cx=cx, half_w=half_w, apex=apex, dome=dome, dome_h=dome_h, heart=heart,
                    heart_c=(hy, hx), hila=hila, lungs=lungs, lung_polys=polys, below=below,
                    mediastinum=mediastinum, spine_x=spine_x, knob=knob)


def _ribs(rng, a: _Anatomy, h: int, w: int) -> np.ndarray:
    """Posterior ribs (bands with brighter cortices) and fainter anterior ribs, [H, W]."""
    yy, xx = _grid(h, w)
    u = np.abs(xx - a.cx)
    u0, u1 = 0.03, a.half_w + 0.035
    t = (u - u0) / (u1 - u0)
    inside = (t >= 0) & (t <= 1)
    t = np.clip(t, 0, 1)
    n = 11
    low = max(a.dome.values())
    spacing = (low - a.apex) / 9.0 * rng.uniform(0.95, 1.05)
    y0 = (a.apex - 0.05 + spacing * np.arange(n) * np.linspace(0.85, 1.15, n)).astype(_F32)
    # A posterior rib leaves the spine slightly upward, then sweeps down along the lateral wall.
    q = yy - (-0.03 * t + 0.20 * t * t)
    k = np.clip(np.round(np.interp(q, y0, np.arange(n))), 0, n - 1).astype(np.int64)
    d = np.abs(q - y0[k])
    th = 0.5 * spacing * rng.uniform(0.85, 1.0)
    band = d < 0.5 * th
    cortex = np.exp(-((d - 0.42 * th) / (0.12 * th)) ** 2)
    post = (0.6 * band + 0.5 * cortex) * (inside & (q > y0[0] - th))
    # Anterior ribs: from the lateral wall sloping down toward the sternum; fainter, thinner.
    qa = yy - 0.17 * (1 - t) ** 1.3
    ya = y0 + _F32(0.11)
    ka = np.clip(np.round(np.interp(qa, ya, np.arange(n))), 0, n - 1).astype(np.int64)
    ant = (np.abs(qa - ya[ka]) < 0.3 * th) & inside & (t > 0.25) & (qa > ya[0] - th) & (qa < ya[6])
    return 0.09 * post + 0.035 * ant


def _vessels(rng, a: _Anatomy, side: str, h: int, w: int, crowd: float) -> np.ndarray:
    """Branching vessel markings radiating from the hilum, [H, W] weights (before masking)."""
    hy, hx = a.hila[side]
    sgn = -1.0 if side == "right" else 1.0
    n0 = 8
    # angle from "straight lateral", negative = upward; the lower lobes get more vessels
    ang = np.linspace(-1.3, 1.3, n0) + rng.normal(0, 0.1, n0)
    ln = rng.uniform(0.09, 0.14, n0) * crowd
    sy, sx, wt = np.full(n0, hy), np.full(n0, hx), np.ones(n0)
    ys, xs, ws = [], [], []
    for depth in range(3):
        m = max(4, int(ln.max() * h * 2))
        tt = np.linspace(0, 1, m)[None]
        wig = np.cumsum(rng.normal(0, 0.0025, (len(ang), m)), axis=1)
        dyv, dxv = np.sin(ang)[:, None], sgn * np.cos(ang)[:, None]
        ys.append(sy[:, None] + tt * ln[:, None] * dyv + wig * dxv)
        xs.append(sx[:, None] + tt * ln[:, None] * dxv - wig * dyv)
        ws.append(np.broadcast_to(wt[:, None] * (1 - 0.4 * tt), (len(ang), m)))
        sy, sx = np.repeat(ys[-1][:, -1], 2), np.repeat(xs[-1][:, -1], 2)
        ang = np.repeat(ang, 2) + np.tile([-0.4, 0.4], len(ang)) + rng.normal(0, 0.12, 2 * len(ang))
        ln = np.repeat(ln, 2) * rng.uniform(0.55, 0.8, 2 * len(ln))
        wt = np.repeat(wt, 2) * 0.6
    return _splat(np.concatenate([v.ravel() for v in ys]), np.concatenate([v.ravel() for v in xs]),
                  np.concatenate([v.ravel() for v in ws]), h, w)


# ----------------------------------------------------------------------------------------------------
# Findings.

def _zone_mask(a: _Anatomy, side: str, zone: Optional[str], h: int, w: int) -> np.ndarray:
    """Where a zone of one lung (patient's ``side``) lies, [H, W] bool."""
    yy, xx = _grid(h, w)
    lung = a.lungs[side]
    if zone is None:
        return lung
    if zone == "abdomen":             # only devices are placed here; a lesion falls back to the lung
        return lung
    if zone == "retrocardiac":
        return a.heart & (yy > a.heart_c[0] - 0.03) & (xx > a.cx + 0.02)
    if zone == "hilum":
        hy, hx = a.hila[side]
        return lung & ((yy - hy) ** 2 + (xx - hx) ** 2 < 0.075 ** 2)
    rows = np.flatnonzero(lung.any(axis=1))
    top, bot = rows[0] / h, (rows[-1] + 1) / h
    f = (yy - top) / (bot - top)
    if zone in ("middle", "lingula"):   # right middle lobe / lingula: lower-middle, against the heart
        return lung & (f > 0.45) & (f < 0.85) & (np.abs(xx - a.cx) < 0.7 * a.half_w)
    lo, hi = {"apex": (0.0, 0.2), "upper": (0.05, 0.45), "lower": (0.55, 1.0), "base": (0.68, 1.0)}[zone]
    return lung & (f >= lo) & (f <= hi)


def _lesion_sides(f: Finding, rng) -> tuple[str, ...]:
    if f.side is None:
        if f.zone in ("lingula", "retrocardiac"):
            return ("left",)
        if f.zone == "middle":
            return ("right",)
        return (str(rng.choice(["right", "left"])),)
    return _sides_of(f.side, "right")


def _pick(rng, region: np.ndarray, fallback: np.ndarray) -> tuple[float, float]:
    """A random pixel centre (normalised y, x) inside ``region`` (or ``fallback`` if it is empty)."""
    idx = np.flatnonzero(region)
    if idx.size == 0:
        idx = np.flatnonzero(fallback)
    h, w = region.shape
    i = int(idx[rng.integers(idx.size)])
    return ((i // w) + 0.5) / h, ((i % w) + 0.5) / w


def _blob(rng, cy, cx, r, lobes, h, w):
    """A lobulated soft blob: a normalised sum of Gaussians, [H, W] in [0, 1]."""
    yy, xx = _grid(h, w)
    field = np.zeros((h, w), _F32)
    for _ in range(lobes):
        oy, ox = rng.normal(0, 0.6 * r, 2) if lobes > 1 else (0.0, 0.0)
        s = r * rng.uniform(0.6, 1.0)
        field += np.exp(-((yy - float(cy + oy)) ** 2 + (xx - float(cx + ox)) ** 2) / float(2 * s * s))
    return field / max(float(field.max()), 1e-6)


class _Canvas:
    """Density layers and per-finding ground truth collected while findings are drawn."""

    def __init__(self, h, w):
        self.h, self.w = h, w
        self.density = np.zeros((h, w), _F32)      # added before the film blur
        self.metal = np.zeros((h, w), _F32)        # added after it (sharp, bright)
        self.no_markings = np.zeros((h, w), bool)  # lung with no vessel markings (air or fluid)
        self.out: list[tuple[str, np.ndarray, Finding]] = []

    def add(self, f: Finding, mask: np.ndarray):
        if mask.any():
            self.out.append((f.name or f.kind, mask, f))


def _draw_lesion(rng, c: _Canvas, a: _Anatomy, f: Finding):
    """Draws a finding that sits in a lung zone, once per side."""
    h, w = c.h, c.w
    yy, xx = _grid(h, w)
    big = {"large": 1.4, "severe": 1.4, "moderate": 1.2}.get(f.severity, 1.0)
    small = 0.75 if f.severity in _SMALL else 1.0
    px = max(1.0, 128.0 / h)   # keeps tiny things at least about a pixel wide on small images
    for side in _lesion_sides(f, rng):
        lung = a.lungs[side]
        zone = _zone_mask(a, side, f.zone, h, w)
        area = (lung | zone) if f.zone == "retrocardiac" else lung
        if f.kind in ("opacity", "consolidation") and f.diffuse:
            # Interstitial/diffuse: a reticular texture over the lower two thirds of the lung.
            texture = _blur(rng.random((h, w), dtype=_F32), 0.7 * h / 128)
            region = lung & (yy > a.hila[side][0] - 0.12)
            c.density += (0.10 * (texture > 0.5) + 0.06) * region
            c.add(f, region)
        elif f.kind == "consolidation":
            cy, cx = _pick(rng, zone, lung)
            r = 0.06 * big * small
            field = _blob(rng, cy, cx, r, 4, h, w)
            # Lobar: fill the zone around the centre, with a sharp border.
            near = (yy - cy) ** 2 + (xx - cx) ** 2 < (1.4 * r) ** 2
            region = zone & ((field > 0.3) | near)   # lobar: stops at the zone's edge, like a fissure
            c.density += 0.32 * region
            # Air bronchograms: dark branching lines inside the consolidation.
            bronchi = _blur(np.minimum(_vessels(rng, a, side, h, w, 1.0), 1.0), 0.4)
            c.density -= 0.08 * bronchi * region
            c.no_markings |= region
            c.add(f, region)
        elif f.kind == "opacity":
            cy, cx = _pick(rng, zone, lung)
            field = _blob(rng, cy, cx, 0.05 * big * small, 5, h, w)
            mottle = _blur(rng.random((h, w), dtype=_F32), 1.0 * h / 128)
            c.density += 0.25 * _smoothstep(field / 0.6) * (0.5 + mottle) * area
            c.add(f, area & (field > 0.35))
        elif f.kind in ("nodule", "mass", "granuloma"):
            n = 1
            if f.multiple:
                n = int(rng.integers(3, 6)) if f.kind == "granuloma" else int(rng.integers(2, 4))
            mask = np.zeros((h, w), bool)
            for _ in range(n):
                cy, cx = _pick(rng, zone, lung)
                if f.kind == "granuloma":   # calcified: tiny and as bright as bone
                    r = rng.uniform(0.008, 0.012) * px
                    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                    c.density += 0.45 * (d2 < r * r) + 0.2 * np.exp(-d2 / (2 * r * r))
                    mask |= d2 < (r + 0.7 / h) ** 2
                else:
                    r = (rng.uniform(0.016, 0.024) if f.kind == "nodule" else rng.uniform(0.04, 0.06)) * big
                    field = _blob(rng, cy, cx, r, 1 if f.kind == "nodule" else 4, h, w)
                    c.density += 0.28 * _smoothstep((field - 0.25) / 0.35)
                    mask |= field > 0.45
            c.add(f, mask & (area | a.heart))
        elif f.kind == "effusion":
            level = {"small": 0.12, "mild": 0.12, "borderline": 0.08, "moderate": 0.28,
                     "large": 0.45, "severe": 0.45}.get(f.severity, 0.18) * rng.uniform(0.85, 1.15)
            rows = np.flatnonzero(lung.any(axis=1))
            top, bot = rows[0] / h, (rows[-1] + 1) / h
            y_lat = bot - level * (bot - top) - 0.01
            u = np.clip(np.abs(xx - a.cx) / a.half_w, 0, 1)   # 1 at the lateral wall
            # Meniscus: highest against the lateral chest wall, falling medially.
            y_men = y_lat + 0.06 * (1 - u) ** 1.5
            dome_y = _dome_curve(a.cx, a.half_w, a.dome[side], a.dome_h, side, xx)
            region = _fill_polygon(a.lung_polys[side], h, w) & (yy > y_men) & (yy < dome_y + 0.01) & ~a.heart
            c.density += 0.44 * (region & ~a.below) * _smoothstep((yy - y_men) / 0.05 + 0.25)
            c.no_markings |= region
            c.add(f, region)
        elif f.kind == "atelectasis":
            zb = _zone_mask(a, side, f.zone or "base", h, w)
            cy, cx = _pick(rng, zb, lung)
            ry, rx = _rotated(yy, xx, cy, cx, np.deg2rad(rng.uniform(-15, 15)))
            ly, lx = rng.uniform(0.009, 0.014) * px * small, rng.uniform(0.07, 0.11)
            e = (ry / ly) ** 2 + (rx / lx) ** 2
            c.density += 0.30 * np.exp(-np.maximum(e - 0.6, 0) * 2.0) * (e < 3) * area
            c.add(f, (e <= 1.6) & area)
        elif f.kind == "pneumothorax":
            scale = {"small": 0.9, "mild": 0.9, "moderate": 0.82, "large": 0.72, "severe": 0.72}.get(
                f.severity, 0.85)
            hy, hx = a.hila[side]
            poly = a.lung_polys[side]
            collapsed = np.stack([hy + (poly[:, 0] - hy) * scale, hx + (poly[:, 1] - hx) * scale], 1)
            inner = _fill_polygon(collapsed, h, w)
            region = lung & ~inner
            if f.zone in (None, "apex", "upper"):
                region &= yy < hy
            c.no_markings |= region
            c.density -= 0.07 * region
            # The visceral pleural line: the collapsed lung's edge next to the gas.
            near_gas = _blur(region, 1.0) > 0.1
            edge = inner & ~(np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1)
                             & np.roll(inner, -1, 1))
            c.density += 0.22 * (edge & near_gas & lung)
            c.add(f, region)


def _draw_device(rng, c: _Canvas, a: _Anatomy, f: Finding):
    h, w = c.h, c.w
    yy, xx = _grid(h, w)
    kind = f.device or "catheter"
    sgn = {"right": -1.0, "left": 1.0}.get(f.side, float(rng.choice([-1.0, 1.0])))
    px = 128.0 / h                 # line widths below are in pixels of a 128-pixel image
    layer = np.zeros((h, w), _F32)
    ap, cx = a.apex, a.cx
    hy, hx = a.heart_c
    svc = (ap + 0.15, cx - 0.035)
    if kind == "catheter":         # central line: from a jugular/subclavian entry down the SVC
        entry = (ap + rng.uniform(-0.04, 0.04), cx + sgn * rng.uniform(0.14, 0.24))
        tip = (hy - rng.uniform(0.06, 0.14), cx - rng.uniform(0.01, 0.04))
        pts = np.concatenate([_bezier(entry, (entry[0] + 0.05, (entry[1] + svc[1]) / 2), svc),
                              _bezier(svc, (svc[0] + 0.1, svc[1] - 0.005), tip)[1:]])
        layer = 0.8 * _line(pts, 1.1 / px, h, w)
    elif kind == "pacemaker":      # generator in the upper chest, leads into the right heart
        gy, gx = ap + rng.uniform(0.0, 0.06), cx + sgn * rng.uniform(0.19, 0.26)
        ry, rx = _rotated(yy, xx, gy, gx, rng.uniform(-0.4, 0.4))
        layer = _blur((np.abs(ry) < 0.027) & (np.abs(rx) < 0.038), 0.5)
        for k in range(int(rng.integers(1, 3))):
            tip = (hy + rng.uniform(0.0, 0.06), hx + rng.uniform(-0.04, 0.06) + 0.03 * k)
            pts = np.concatenate([_bezier((gy, gx), (gy + 0.03, cx + sgn * 0.07), svc),
                                  _bezier(svc, (hy - 0.06, cx - 0.05), tip)[1:]])
            layer = np.maximum(layer, 0.85 * _line(pts, 1.0 / px, h, w))
    elif kind == "sternotomy":     # wire loops down the sternum
        n = int(rng.integers(4, 7))
        for y in np.linspace(ap + 0.14, hy + 0.02, n) + rng.normal(0, 0.006, n):
            ring = np.abs(np.hypot((yy - float(y)) / 0.010, (xx - cx - rng.normal(0, 0.006)) / 0.018) - 1) < 0.5
            layer = np.maximum(layer, _blur(ring, 0.4) * 1.4)
    elif kind == "clips":          # surgical clips: upper abdomen or hilum
        y_base = a.dome["right"] + 0.08 if f.zone != "hilum" else a.hila["right"][0]
        for _ in range(int(rng.integers(2, 6))):
            ry, rx = _rotated(yy, xx, y_base + rng.uniform(-0.03, 0.05), cx + sgn * rng.uniform(0.05, 0.2),
                              rng.uniform(0, np.pi))
            layer = np.maximum(layer, _blur((np.abs(ry) < 0.005 * px) & (np.abs(rx) < 0.018), 0.4) * 1.5)
    elif kind == "tube":
        top = (0.0, cx + rng.normal(0, 0.004))
        if f.zone == "abdomen" or (f.zone is None and rng.random() < 0.4):   # enteric tube to the stomach
            mid = (hy, cx + 0.01)
            end = (a.dome["left"] + rng.uniform(0.06, 0.12), cx + rng.uniform(0.08, 0.15))
            pts = np.concatenate([np.array([top, mid], _F32), _bezier(mid, (a.dome["left"], cx + 0.02), end)[1:]])
        else:                      # endotracheal tube, tip a few cm above the carina
            pts = np.array([top, (ap + rng.uniform(0.07, 0.12), cx + rng.normal(0, 0.004))], _F32)
        layer = 0.75 * _line(pts, 1.8 / px, h, w)
    elif kind == "stent":
        ry, rx = _rotated(yy, xx, hy + rng.uniform(-0.05, 0.03), hx + rng.uniform(-0.05, 0.05),
                          rng.uniform(0, np.pi))
        body = (np.abs(ry) < 0.008 * px) & (np.abs(rx) < 0.03)
        layer = _blur(body, 0.4) * (0.6 + 0.4 * (np.sin(rx * 400) > 0))
    layer = np.clip(layer, 0, 1)
    c.metal = np.maximum(c.metal, layer)
    c.add(f, layer > 0.3)


# ----------------------------------------------------------------------------------------------------

def render(findings: Sequence[Finding] = (), *, seed: Union[int, Sequence[int], np.random.Generator] = 0,
           size: Union[int, tuple[int, int]] = 128) -> Rendering:
    """Renders one frontal chest radiograph showing ``findings``.

    Args:
      findings: what to draw (empty: a normal film).
      seed: an int, a sequence of ints (e.g. (data set seed, report id)) or a numpy Generator; the
        image is a pure function of (findings, seed, size).
      size: H (= W) or (H, W) in pixels.

    Returns:
      A ``Rendering``: the [H, W] uint8 image, and per drawn finding its name, [4] box and [H, W] mask.
    """
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    findings = list(findings)
    kinds = {f.kind for f in findings}
    yy, xx = _grid(h, w)
    a = _anatomy(rng, findings, h, w)
    c = _Canvas(h, w)
    lung_any = a.lungs["right"] | a.lungs["left"]
    s128 = h / 128.0

    # Body: soft tissue, thickest in the middle; shoulders at the top, neck above, air outside.
    body_w = a.half_w + rng.uniform(0.06, 0.10) + 0.3 * _smoothstep((a.apex + 0.1 - yy) / 0.1)
    body_w = np.where(yy < a.apex - 0.03, 0.10 + 0.5 * _smoothstep((yy - a.apex + 0.1) / 0.07), body_w)
    dist = np.abs(xx - a.cx)
    thick = 1 - 0.3 * np.minimum(dist / body_w, 1) ** 2
    d = 0.55 * (dist < body_w) * thick
    # Breast / pectoral soft tissue over the lower lateral lungs on some films.
    if rng.random() < 0.5:
        for sgn in (-1.0, 1.0):
            by, bx = max(a.dome.values()) - rng.uniform(0.0, 0.06), a.cx + sgn * a.half_w * 0.65
            bb = ((yy - by) / 0.13) ** 2 + ((xx - bx) / 0.2) ** 2 < 1
            d += rng.uniform(0.04, 0.08) * bb

    # Lungs (air), denser toward the apices where the shoulder girdle overlaps.
    lucency = 0.36 - 0.06 * _smoothstep((a.apex + 0.15 - yy) / 0.15)
    if "hyperinflation" in kinds:
        lucency = lucency + 0.04
    d -= lucency * lung_any

    # Mediastinum, heart, abdomen under the domes: one water density where they overlap.
    water = a.mediastinum | a.heart | a.below
    d += 0.28 * water
    ky, kx, kr = a.knob
    desc_x = kx - 0.3 * kr + 0.015 * np.sin(np.pi * np.clip((yy - ky) / 0.4, 0, 1))
    if "tortuous_aorta" in kinds:
        desc_x = desc_x + 0.03 * np.sin(np.pi * np.clip((yy - ky) / 0.35, 0, 1))
    aorta_desc = (np.abs(xx - desc_x) < 0.02) & (yy > ky) & (yy < a.dome["left"])
    d += 0.10 * (aorta_desc & lung_any)
    gas = (((yy - a.dome["left"] - rng.uniform(0.05, 0.08)) / rng.uniform(0.025, 0.04)) ** 2
           + ((xx - a.cx - rng.uniform(0.13, 0.2)) / rng.uniform(0.04, 0.07)) ** 2 < 1)
    d -= 0.16 * (gas & a.below)
    carina = a.apex + rng.uniform(0.17, 0.21)
    trachea = (np.abs(xx - a.cx - 0.004) < 0.017) & (yy < carina)
    for sgn in (-1.0, 1.0):        # main bronchi
        bt = np.clip((yy - carina) / 0.07, 0, 1)
        trachea |= (np.abs(xx - a.cx - sgn * 0.05 * bt) < 0.011) & (yy >= carina) & (yy < carina + 0.06)
    d -= 0.10 * trachea

    # Findings in the lungs, then vessel markings where lung still holds air.
    for f in findings:
        if f.kind in _REGIONAL:
            _draw_lesion(rng, c, a, f)
    crowd = 0.85 if "hypoinflation" in kinds else (1.1 if "hyperinflation" in kinds else 1.0)
    vessels = _vessels(rng, a, "right", h, w, crowd) + _vessels(rng, a, "left", h, w, crowd)
    vessels = _blur(np.minimum(vessels, 1.5), 0.7 * s128) * s128
    weight = 0.10 * (1.4 if "hypoinflation" in kinds else 1.0) * (0.7 if "hyperinflation" in kinds else 1.0)
    d += weight * vessels * (lung_any & ~c.no_markings)
    for side in ("right", "left"):
        hy, hx = a.hila[side]
        d += 0.10 * np.exp(-((yy - hy) ** 2 / 0.003 + (xx - hx) ** 2 / 0.0012)) * ~c.no_markings

    # Global findings with a region to report.
    for f in findings:
        if f.kind == "cardiomegaly":
            c.add(f, a.heart)
        elif f.kind in ("hyperinflation", "hypoinflation"):
            c.add(f, lung_any)
        elif f.kind == "elevated_diaphragm":
            for side in _sides_of(f.side, "right"):
                side_half = (xx < a.cx) if side == "right" else (xx >= a.cx)
                dome_y = _dome_curve(a.cx, a.half_w, a.dome[side], a.dome_h, side, xx)
                band = side_half & (np.abs(yy - dome_y) < 0.03) & (dist < a.half_w) & ~a.heart
                c.add(f, band)
        elif f.kind == "edema":
            haze = np.zeros((h, w), _F32)
            for side in ("right", "left"):
                hy, hx = a.hila[side]
                haze += np.exp(-((yy - hy) ** 2 / 0.015 + (xx - hx) ** 2 / 0.008))
            mottle = _blur(rng.random((h, w), dtype=_F32), 1.0 * s128)
            d += 0.22 * haze * (0.6 + 0.8 * mottle) * lung_any
            kerley = np.zeros((h, w), _F32)   # Kerley B lines: short horizontal lines at the bases
            for side, sgn in (("right", -1.0), ("left", 1.0)):
                for _ in range(int(rng.integers(3, 6))):
                    y = a.dome[side] - rng.uniform(0.0, 0.08)
                    x0 = a.cx + sgn * a.half_w * rng.uniform(0.8, 0.95)
                    kerley += _line(np.array([(y, x0), (y, x0 - sgn * 0.03)], _F32), 0.6, h, w)
            d += 0.06 * np.minimum(kerley, 1) * lung_any
            c.add(f, (haze > 0.35) & lung_any)
        elif f.kind == "tortuous_aorta":
            knob = (yy - ky) ** 2 + (xx - kx) ** 2 < kr * kr
            c.add(f, (knob | aorta_desc) & (yy < a.heart_c[0] + 0.05))
        elif f.kind == "scoliosis":
            c.add(f, (np.abs(xx - a.spine_x[:, None]) < 0.04) & (yy > 0.08) & (yy < max(a.dome.values())))

    # Bones: ribs, clavicles, humeral heads, thoracic spine.
    # Dense water (heart, abdomen) hides most of the ribs behind it.
    d += _ribs(rng, a, h, w) * (dist < body_w) * (1 - 0.6 * water)
    for sgn in (-1.0, 1.0):
        u = sgn * (xx - a.cx)
        t = np.clip((u - 0.03) / 0.30, 0, 1)
        y_c = a.apex + 0.06 - 0.075 * t + 0.02 * np.sin(np.pi * t) + rng.normal(0, 0.006)
        clav = (np.abs(yy - y_c) < 0.011 + 0.005 * (1 - t)) & (u > 0.025) & (u < 0.34)
        d += 0.14 * clav
        hum = (yy - a.apex - 0.02) ** 2 + (xx - a.cx - sgn * (a.half_w + 0.14)) ** 2 < 0.075 ** 2
        d += 0.10 * hum
    vert_h = (max(a.dome.values()) - a.apex) / 7.5
    phase = ((yy - a.apex) / vert_h) % 1.0
    spine_u = np.abs(xx - a.spine_x[:, None])
    vertebra = (spine_u < 0.032) & (yy > 0.02)
    endplate = (phase < 0.07) | (phase > 0.80) & (phase < 0.86)
    disc = phase >= 0.86
    pedicle = (np.abs(spine_u - 0.022) < 0.007) & (np.abs(phase - 0.3) < 0.14)
    d += vertebra * (0.055 + 0.04 * endplate - 0.04 * disc) + 0.04 * pedicle
    for f in findings:
        if f.kind == "spine_degeneration":
            n = {"mild": 2, "moderate": 4, "severe": 6}.get(f.severity, 3) + int(rng.integers(0, 2))
            mask = np.zeros((h, w), bool)
            for lv in rng.choice(np.arange(2, 9), size=min(n, 7), replace=False):
                y = a.apex + (lv + 0.85) * vert_h + rng.normal(0, 0.003)   # at a disc space
                for sgn in (-1.0, 1.0):
                    if rng.random() < 0.3:
                        continue
                    # an osteophyte: a bright beak off the vertebral margin at a disc space
                    sx = float(a.spine_x[min(int(y * h), h - 1)]) + sgn * 0.04
                    d += 0.28 * (((yy - y) / 0.011) ** 2 + ((xx - sx) / 0.017) ** 2 < 1)
                    mask |= ((yy - y) / 0.018) ** 2 + ((xx - sx) / 0.024) ** 2 < 1
            c.add(f, mask)
    for f in findings:
        if f.kind == "device":
            _draw_device(rng, c, a, f)

    # Film: blur, metal on top, noise, windowing.
    d = _blur(d + c.density, rng.uniform(0.6, 0.9) * s128)
    d += 0.9 * c.metal
    d += 0.03 * _upsample(rng.standard_normal((6, 6), dtype=_F32), h, w)
    d += 0.025 * _blur(rng.standard_normal((h, w), dtype=_F32), 0.8 * s128) * lung_any
    d += rng.uniform(0.008, 0.018) * rng.standard_normal((h, w), dtype=_F32)
    lo, hi = rng.uniform(-0.03, 0.03), rng.uniform(0.92, 1.02)
    img = np.clip((d - lo) / (hi - lo), 0, 1) ** rng.uniform(0.85, 1.15)
    # Film response: contrast compresses toward white (dense regions), like a film's shoulder.
    k = rng.uniform(1.0, 1.5)
    img = (1 - np.exp(-k * img)) / (1 - np.exp(-k))
    image = np.round(img * 255).astype(np.uint8)

    names = [n for n, _, _ in c.out]
    masks = np.stack([m for _, m, _ in c.out]) if c.out else np.zeros((0, h, w), bool)
    boxes = np.stack([mask_box(m) for m in masks]) if c.out else np.zeros((0, 4), _F32)
    return Rendering(image=image, names=names, boxes=boxes.astype(_F32), masks=masks,
                     sources=[f for _, _, f in c.out],
                     anatomy={"lung_right": a.lungs["right"], "lung_left": a.lungs["left"],
                              "heart": a.heart})
