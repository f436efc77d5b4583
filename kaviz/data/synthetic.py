"""Synthetic shapes and scenes: one vectorised NumPy renderer, deterministic from ``(seed, index)``.

Every image ``i`` of seed ``s`` gets a fixed-length vector of uniforms that is a hash of
``(s, i, lo, hi)`` alone (``lo``/``hi`` = the object-count range; SplitMix64, counter-based, so
the draws of a whole batch are one vectorised computation); all pixels are then computed for the
whole batch at once (coordinate grids, signed distance fields, broadcasting). So image ``i`` is
identical whether it is rendered alone, in a batch of 10 or among 10,000, and in whatever order.
5,000 32x32 images render in about 0.3 s on one core (bench/bench_data.py).

Three views are built on the renderer:

- :func:`shapes` -- one object per image, label = the shape kind (``SHAPES``);
- :func:`shape_attributes` -- the *same* images as :func:`shapes` (same ``seed``/``size``), with
  ``len(ATTRIBUTES)`` binary attributes derived from the generation parameters as targets;
- :func:`scenes` -- 1..``max_objects`` objects at random depths (nearer objects occlude farther
  ones), with multi-hot labels, VOC-style ``difficult`` flags, a class mask and a depth map
  (stand-ins for VOC multi-label and NYUv2 segmentation + depth, SPEC.md §2 and §4.2);
  ``scenes(..., normals=True)`` adds a surface-normal map derived from the depth map
  (:func:`depth_normals`; no random number is drawn for it).

Colour, size, texture, position, rotation (within +-10 degrees) and background are drawn
independently of the shape kind, so nothing but the outline tells the class. Objects are always
lighter than the background behind them (see the difficulty knobs below for why).

A *pretraining world*, disjoint from the notebooks' tasks, is rendered by the same code over a
second vocabulary of outlines, ``PRETRAIN_SHAPES`` (30 kinds: polygons, stars, letters, arcs, dot
groups, ...; none of them is one of ``SHAPES`` or a near-copy), selected by
``render_scenes(..., vocabulary="pretrain")``. It is the analogue of ImageNet for the zoo of
pretrained CPU backbones:

- :func:`pretraining` -- one object per image, label = index into ``PRETRAIN_SHAPES`` (as
  :func:`shapes`, with colours, textures, backgrounds and positions drawn the same way);
- :func:`pretraining_scenes` -- the multi-object scenes of :func:`scenes` over ``PRETRAIN_SHAPES``
  (multi-hot labels, class mask, depth), for pretraining dense encoder-decoders.

The pretraining vocabulary also draws its uniforms from its own stream (the per-image key mixes in
a vocabulary tag), so its backgrounds, colours and positions are not those of the notebook images
of the same seed and index either; and whatever the seed, no pretraining image can show a
notebook class, since the two vocabularies share no outline. The default vocabulary
(``"notebook"`` = ``SHAPES``) draws exactly the uniforms and pixels it always did.
"""
from __future__ import annotations

import math

import numpy as np

from .core import ImageDataset, digest

__all__ = [
    "SHAPES",
    "TEXTURES",
    "BACKGROUNDS",
    "COLOURS",
    "ATTRIBUTES",
    "render_scenes",
    "background_depth",
    "NORMALS_VIEW_WIDTH",
    "depth_normals",
    "shapes",
    "shape_attributes",
    "scenes",
    "PRETRAIN_SHAPES",
    "VOCABULARIES",
    "pretraining",
    "pretraining_scenes",
]

# Bump when a change to the renderer changes any pixel: it is part of every fingerprint, so caches
# keyed on the old images are never reused.
GENERATOR_VERSION = 2  # 2: milder rotation, objects lighter than the background, finer textures

SHAPES = [
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "ring",
    "star",
    "hexagon",
    "ellipse",
    "crescent",
]
# The pretraining world's outlines (:func:`pretraining`, :func:`pretraining_scenes`): disjoint from
# SHAPES, each told apart from the others by its outline at 32x32 (tests/test_pretraining_world.py).
PRETRAIN_SHAPES = [
    "pentagon",
    "star4",
    "star6",
    "star8",
    "heart",
    "arrow",
    "chevron",
    "l_shape",
    "t_shape",
    "h_shape",
    "u_shape",
    "z_shape",
    "y_shape",
    "semicircle",
    "quarter_disc",
    "pacman",
    "half_ring",
    "square_ring",
    "triangle_ring",
    "pill",
    "bar",
    "trapezoid",
    "parallelogram",
    "keyhole",
    "teardrop",
    "hourglass",
    "trefoil",
    "two_dots",
    "three_dots",
    "four_dots",
]
#: The kind vocabularies of :func:`render_scenes`: ``"notebook"`` (the default, the notebooks'
#: tasks) and ``"pretrain"`` (the pretraining world).
VOCABULARIES = {"notebook": SHAPES, "pretrain": PRETRAIN_SHAPES}
# Per-vocabulary stream tag mixed into the per-image key of :func:`_draw_uniforms` (0: none, so the
# notebook images keep their uniforms); "pretrain" in ASCII.
_STREAMS = {"notebook": 0, "pretrain": 0x707265747261696E}
# Bump when an outline of PRETRAIN_SHAPES changes: it is part of the pretraining fingerprints only,
# so the notebooks' caches survive such a change.
_PRETRAIN_VERSION = 1
_PRETRAIN_TAG = ("vocabulary", "pretrain", _PRETRAIN_VERSION)  # in the pretraining fingerprints
TEXTURES = ["solid", "stripes", "checker", "dots"]
BACKGROUNDS = ["plain", "gradient", "noise", "stripes"]
# Palette hues (HSV hue in [0, 1)); each object gets one with a little jitter. Half are warm.
COLOURS = {
    "red": 0.0,
    "orange": 0.075,
    "yellow": 0.15,
    "pink": 0.9,
    "green": 0.33,
    "cyan": 0.5,
    "blue": 0.62,
    "purple": 0.76,
}
_WARM = ("red", "orange", "yellow", "pink")
_ROUND = ("circle", "ring", "ellipse", "crescent")
_POINTY = ("triangle", "diamond", "star")
ATTRIBUTES = [
    "warm_colour",      # red / orange / yellow / pink object (vs green / cyan / blue / purple)
    "large",            # radius in the upper half of its range
    "textured",         # stripes, checker or dots (vs solid)
    "on_left",          # object centre left of the image centre
    "on_top",           # object centre above the image centre
    "dark_background",  # dark wall (vs a mid-grey one)
    "round",            # curved outline: circle, ring, ellipse, crescent
    "pointy",           # acute corners: triangle, diamond, star
]

# A class is "difficult" in a scene (VOC's flag: counted positive in training, ignored in
# evaluation) when every instance of it covers fewer than TINY_FRACTION of the image or shows less
# than VISIBLE_FRACTION of its own footprint.
TINY_FRACTION = 0.012
VISIBLE_FRACTION = 0.35

BACKGROUND_DEPTH = (6.0, 10.0)  # nearest (top/bottom edge) and farthest (horizon) background depth
OBJECT_DEPTH = (1.0, 4.0)       # objects are always nearer than any background pixel
#: Width of the image in depth units for :func:`depth_normals` (pixels are square, the projection
#: orthographic): the image spans as much sideways as the farthest background lies deep, so the
#: background planes of :func:`scenes` lean by about 30-40 degrees whatever the image size.
NORMALS_VIEW_WIDTH = BACKGROUND_DEPTH[1]

# Difficulty knobs, tuned so that a 3-layer CNN (16-32-64 channels) learns `shapes` (5,000
# images, 32x32) to roughly 80-95 % validation accuracy in 3 epochs of Adam. Each nuisance costs a
# small CNN many steps: with full 360-degree rotation it stays near 25 % after 3 epochs, and with
# a contrast polarity that flips between images (dark objects on light backgrounds and light
# objects on dark ones) near 40-50 %.
_SIZE = (0.2, 0.38)        # single-object radius range, as a fraction of the image side
_ROTATION = 10.0           # rotations are drawn uniformly in [-_ROTATION, _ROTATION] degrees
_TEXTURE_CONTRAST = 0.3    # how far the second texture colour moves towards the background
_BG_CONTRAST = 0.1         # amplitude of the background patterns
_DARK_BG = (0.04, 0.2)     # HSV value range of dark backgrounds
_LIGHT_BG = (0.3, 0.45)    # HSV value range of the other ("light") backgrounds
_MIN_CONTRAST = 0.25       # objects are at least this much lighter (luminance) than the background
_LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 luminance weights

_NB = 32  # uniforms per image for the background and global draws
_NO = 16  # uniforms per object slot
_NOISE_BANK = 251  # side of the (prime-sized) pixel-noise tile
_CHUNK_PIXELS = 128 * 32 * 32  # pixels rendered at once: bounds memory, never changes a pixel


def check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_size(size, minimum=16):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < minimum:
        raise ValueError(
            f"size must be an int >= {minimum} (the side of the square image in pixels), got "
            f"{size!r}; shapes are unrecognisable below that"
        )
    return int(size)


def _vocabulary(vocabulary):
    """``(kinds, stream)`` of a vocabulary name (``VOCABULARIES``)."""
    if not isinstance(vocabulary, str) or vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {sorted(VOCABULARIES)} (\"notebook\": SHAPES, the notebooks' "
                         f"tasks; \"pretrain\": PRETRAIN_SHAPES, the pretraining world), got {vocabulary!r}")
    return VOCABULARIES[vocabulary], _STREAMS[vocabulary]


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n (the number of images) must be a positive int, got {n!r}")
    return int(n)


_NOISE_CACHE: dict = {}


def _noise_bank():
    # Pixel noise is read from one fixed tile at a per-image offset: a per-image random draw of
    # H*W*3 normals costs more than the whole rest of the renderer.
    if "bank" not in _NOISE_CACHE:
        rng = np.random.default_rng(20190810)
        _NOISE_CACHE["bank"] = rng.standard_normal((_NOISE_BANK, _NOISE_BANK, 3)).astype(np.float32)
    return _NOISE_CACHE["bank"]


def noise_windows(size):
    """View (251, 251, 3, size, size): the noise window at each offset, wrapping around the tile."""
    key = ("windows", size)
    if key not in _NOISE_CACHE:
        bank = _noise_bank()
        reps = 1 + -(-size // _NOISE_BANK)
        tiled = np.tile(bank, (reps, reps, 1))[: _NOISE_BANK + size - 1, : _NOISE_BANK + size - 1]
        tiled = np.ascontiguousarray(tiled.transpose(2, 0, 1))  # (3, B+S-1, B+S-1)
        win = np.lib.stride_tricks.sliding_window_view(tiled, (size, size), axis=(1, 2))
        _NOISE_CACHE[key] = win.transpose(1, 2, 0, 3, 4)  # (B, B, 3, S, S)
    return _NOISE_CACHE[key]


def background_depth(horizon, size):
    """Depth of the background rows: ``far - (far - near) * |y/size - h| / max(h, 1 - h)`` for
    pixel centres ``y``, with (near, far) = ``BACKGROUND_DEPTH``: farthest at the horizon ``h``
    (a fraction of the height), nearest at the top or bottom edge. Returns float32 (n, size)."""
    near, far = BACKGROUND_DEPTH
    h = np.atleast_1d(np.asarray(horizon, dtype=np.float64))[:, None]
    y = (np.arange(size) + 0.5)[None, :] / size
    return (far - (far - near) * np.abs(y - h) / np.maximum(h, 1 - h)).astype(np.float32)


def depth_normals(depth, surfaces=None, view_width: float = NORMALS_VIEW_WIDTH) -> np.ndarray:
    """Unit surface normals from a depth map: float32 (n, 3, H, W) for ``depth`` (n, H, W), or
    (3, H, W) for one map (H, W). Deterministic, no random numbers.

    Convention: camera coordinates with x to the right (columns), y downwards (rows) and z towards
    the camera, so a surface facing the camera squarely has the normal (0, 0, 1) and every normal
    faces the camera (z > 0). The surface point of pixel (u, v) is (s·u, s·v, −d(u, v)) with the
    pixel pitch s = ``view_width`` / W (orthographic projection); its normal is the normalised
    ``(∂d/∂u, ∂d/∂v, s)`` (a floor, whose depth falls towards the bottom edge, points up: y < 0).

    The derivatives are finite differences between a pixel and its neighbours **on the same
    surface** (``surfaces``: an int map (n, H, W) of surface ids, e.g. the instance map of
    :func:`render_scenes`; ``None``: one surface): the mean of the forward and the backward
    difference where both neighbours qualify (the central difference), the one that qualifies at a
    surface's edge or the image border, 0 where neither does. So depth jumps between surfaces never
    tilt a normal. Pixels without a valid depth (non-finite or <= 0), and only those, get (0, 0, 0).
    """
    d = np.asarray(depth, dtype=np.float64)
    one = d.ndim == 2
    if one:
        d = d[None]
    if d.ndim != 3 or d.shape[1] < 1 or d.shape[2] < 1:
        raise ValueError(f"depth must be a map (H, W) or maps (n, H, W), got shape {np.shape(depth)}")
    if surfaces is None:
        surf = np.zeros(d.shape, dtype=np.int8)
    else:
        surf = np.asarray(surfaces)
        surf = surf[None] if one and surf.ndim == 2 else surf
        if surf.shape != d.shape:
            raise ValueError(f"surfaces {np.shape(surfaces)} must have the shape of depth {np.shape(depth)} (one "
                             "surface id per pixel), or be None (one surface)")
    if isinstance(view_width, bool) or not isinstance(view_width, (int, float)) or not (
            math.isfinite(view_width) and view_width > 0):
        raise ValueError(f"view_width must be a positive number (the image width in depth units), got {view_width!r}")
    valid = np.isfinite(d) & (d > 0)
    d0 = np.where(valid, d, 0.0)

    def derivative(axis):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        ok = valid[lo] & valid[hi] & (surf[lo] == surf[hi])  # pixel pairs (i, i + 1) on one surface
        step = np.where(ok, d0[hi] - d0[lo], 0.0)
        total = np.zeros(d.shape)
        count = np.zeros(d.shape)
        total[lo] += step  # forward difference of pixel i
        count[lo] += ok
        total[hi] += step  # backward difference of pixel i + 1
        count[hi] += ok
        return total / np.maximum(count, 1)

    pitch = float(view_width) / d.shape[2]
    n = np.stack([derivative(2), derivative(1), np.full(d.shape, pitch)], axis=1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    n *= valid[:, None]
    n = n.astype(np.float32)
    return n[0] if one else n


def hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; inputs broadcast together, output has a trailing axis of 3."""
    h = np.asarray(h, dtype=np.float64) % 1.0
    s = np.asarray(s, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# --- signed distance fields, in units of the object's radius (negative inside) -----------------

def _polygon(u, v, k, apothem):
    # Fold the plane into one sector of the regular k-gon; the edge normal sits at the sector's
    # middle, so the distance to the edge is rho*cos(angle) - apothem.
    rho = np.hypot(u, v)
    sector = 2.0 * math.pi / k
    phi = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2.0)
    return rho * np.cos(phi) - apothem


def _star(u, v, points=5, outer=1.25, inner=0.5):
    rho = np.hypot(u, v)
    sector = 2.0 * math.pi / points
    phi = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2.0)  # tip at phi = 0
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    half = sector / 2.0
    nx, ny = inner * math.sin(half), outer - inner * math.cos(half)  # outward edge normal
    norm = math.hypot(nx, ny)
    return (nx * (px - outer) + ny * py) / norm


def _box(u, v, a, b):
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _sdf(kind, u, v, kinds=SHAPES):
    name = kinds[kind]
    if name in _PRETRAIN_SDF:  # the vocabularies share no name
        return _PRETRAIN_SDF[name](u, v)
    if name == "circle":
        return np.hypot(u, v) - 1.0
    if name == "square":
        return _box(u, v, 0.86, 0.86)
    if name == "triangle":
        return _polygon(u, v, 3, 0.64)
    if name == "diamond":
        a, b = 0.72, 1.3  # half-diagonals: a rhombus, never a rotated square
        return (np.abs(u) * b + np.abs(v) * a - a * b) / math.hypot(a, b)
    if name == "cross":
        return np.minimum(_box(u, v, 1.0, 0.34), _box(u, v, 0.34, 1.0))
    if name == "ring":
        return np.abs(np.hypot(u, v) - 0.74) - 0.28
    if name == "star":
        return _star(u, v)
    if name == "hexagon":
        return _polygon(u, v, 6, 0.9)
    if name == "ellipse":
        a, b = 1.2, 0.62
        return (np.hypot(u / a, v / b) - 1.0) * b
    if name == "crescent":
        return np.maximum(np.hypot(u, v) - 1.05, 0.8 - np.hypot(u - 0.52, v))
    raise AssertionError(name)  # SHAPES and _sdf must list the same kinds


# --- the pretraining outlines (PRETRAIN_SHAPES), same units: about 1 radius, within ~1.25 per axis --

def _rotate(u, v, degrees):
    """The coordinates in which a shape drawn with them appears turned by ``degrees``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return u * c + v * s, v * c - u * s


def _disc(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _rect(u, v, x0, y0, x1, y1):
    """Axis-aligned box between the corners (x0, y0) and (x1, y1)."""
    return _box(u - (x0 + x1) / 2, v - (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2)


def _convex(u, v, pts):
    """Convex polygon through ``pts`` (either orientation): the largest signed distance to its edge lines."""
    gx = sum(p[0] for p in pts) / len(pts)
    gy = sum(p[1] for p in pts) / len(pts)
    d = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        nx, ny = y1 - y0, x0 - x1
        norm = math.hypot(nx, ny)
        nx, ny = nx / norm, ny / norm
        if (gx - x0) * nx + (gy - y0) * ny > 0:  # make the normal point away from the inside
            nx, ny = -nx, -ny
        e = (u - x0) * nx + (v - y0) * ny
        d = e if d is None else np.maximum(d, e)
    return d


def _stroke(u, v, x0, y0, x1, y1, w):
    """A straight stroke of half-width ``w`` from (x0, y0) to (x1, y1), square ends."""
    dx, dy = x1 - x0, y1 - y0
    length = math.hypot(dx, dy)
    t = ((u - x0) * dx + (v - y0) * dy) / length - length / 2
    n = ((v - y0) * dx - (u - x0) * dy) / length
    return np.maximum(np.abs(t) - length / 2, np.abs(n) - w)


def _capsule(u, v, x0, y0, x1, y1, w):
    """A stroke of half-width ``w`` from (x0, y0) to (x1, y1), round ends."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(u - x0 - t * dx, v - y0 - t * dy) - w


def _union(*ds):
    out = ds[0]
    for d in ds[1:]:
        out = np.minimum(out, d)
    return out


def _dots(u, v, centres, r):
    return _union(*(_disc(u, v, x, y, r) for x, y in centres))


def _around(k, radius, start, dy=0.0):
    """``k`` points evenly around a circle, the first at ``start`` degrees (0 = right, 90 = down)."""
    return [(radius * math.cos(math.radians(start + 360 * i / k)),
             dy + radius * math.sin(math.radians(start + 360 * i / k))) for i in range(k)]


def _teardrop(u, v):
    # a disc and the triangle from the tip to the disc's tangent points
    px, py, cx, cy, r = 0.0, -1.12, 0.0, 0.3, 0.72
    dist = math.hypot(cx - px, cy - py)
    tangent, half = math.sqrt(dist * dist - r * r), math.asin(r / dist)
    axis = math.atan2(cy - py, cx - px)
    t1 = (px + tangent * math.cos(axis + half), py + tangent * math.sin(axis + half))
    t2 = (px + tangent * math.cos(axis - half), py + tangent * math.sin(axis - half))
    return np.minimum(_disc(u, v, cx, cy, r), _convex(u, v, [(px, py), t1, t2]))


def _pacman(u, v, mouth=38.0):
    c, s = math.cos(math.radians(mouth)), math.sin(math.radians(mouth))
    wedge = np.maximum(v * c - u * s, -v * c - u * s)  # the mouth, opening to the right
    return np.maximum(np.hypot(u, v) - 1.05, -wedge)


def _triangle_ring(u, v):
    a, b = _rotate(u, v - 0.34, -90)  # apex up, centred
    return np.maximum(_polygon(a, b, 3, 0.68), -_polygon(a, b, 3, 0.3))


# u to the right, v downwards (image rows), so "up" is v < 0.
_PRETRAIN_SDF = {
    "pentagon": lambda u, v: _polygon(*_rotate(u, v - 0.1, -90), 5, 0.84),
    "star4": lambda u, v: _star(u, v, 4, 1.25, 0.42),
    "star6": lambda u, v: _star(*_rotate(u, v, -90), 6, 1.2, 0.62),
    "star8": lambda u, v: _star(u, v, 8, 1.2, 0.68),
    "heart": lambda u, v: _union(_disc(u, v, -0.47, -0.38, 0.55), _disc(u, v, 0.47, -0.38, 0.55),
                                 _convex(u, v, [(-0.98, -0.22), (0.98, -0.22), (0.0, 1.05)])),
    "arrow": lambda u, v: np.minimum(_rect(u, v, -1.15, -0.22, 0.1, 0.22),
                                     _convex(u, v, [(0.0, -0.8), (1.2, 0.0), (0.0, 0.8)])),
    "chevron": lambda u, v: np.maximum(_convex(u, v, [(0.0, -0.95), (1.15, 0.95), (-1.15, 0.95)]),
                                       -_convex(u, v, [(0.0, -0.1), (1.15, 1.8), (-1.15, 1.8)])),
    "l_shape": lambda u, v: np.minimum(_rect(u, v, -0.85, -1.05, -0.25, 1.05), _rect(u, v, -0.85, 0.45, 0.85, 1.05)),
    "t_shape": lambda u, v: np.minimum(_rect(u, v, -1.05, -1.0, 1.05, -0.4), _rect(u, v, -0.3, -1.0, 0.3, 1.05)),
    "h_shape": lambda u, v: _union(_rect(u, v, -0.95, -1.05, -0.37, 1.05), _rect(u, v, 0.37, -1.05, 0.95, 1.05),
                                   _rect(u, v, -0.95, -0.27, 0.95, 0.27)),
    "u_shape": lambda u, v: _union(_rect(u, v, -0.95, -1.0, -0.37, 1.0), _rect(u, v, 0.37, -1.0, 0.95, 1.0),
                                   _rect(u, v, -0.95, 0.42, 0.95, 1.0)),
    "z_shape": lambda u, v: _union(_rect(u, v, -0.95, -1.0, 0.95, -0.45), _rect(u, v, -0.95, 0.45, 0.95, 1.0),
                                   _convex(u, v, [(0.35, -0.46), (0.95, -0.46), (-0.35, 0.46), (-0.95, 0.46)])),
    "y_shape": lambda u, v: _union(_disc(u, v, 0.0, 0.05, 0.25),
                                   *(_stroke(u, v, 0.0, 0.05, x, y, 0.25) for x, y in _around(3, 1.05, 90, 0.05))),
    "semicircle": lambda u, v: np.maximum(_disc(u, v, 0.0, 0.55, 1.15), v - 0.55),
    "quarter_disc": lambda u, v: np.maximum(np.maximum(_disc(u, v, -0.8, 0.8, 1.65), -0.8 - u), v - 0.8),
    "pacman": _pacman,
    "half_ring": lambda u, v: np.maximum(np.abs(np.hypot(u, v - 0.55) - 0.8) - 0.3, v - 0.55),
    "square_ring": lambda u, v: np.maximum(_box(u, v, 0.95, 0.95), -_box(u, v, 0.5, 0.5)),
    "triangle_ring": _triangle_ring,
    "pill": lambda u, v: _capsule(u, v, -0.72, 0.0, 0.72, 0.0, 0.43),
    "bar": lambda u, v: _box(u, v, 1.15, 0.2),
    "trapezoid": lambda u, v: _convex(u, v, [(-1.1, 0.7), (1.1, 0.7), (0.5, -0.7), (-0.5, -0.7)]),
    "parallelogram": lambda u, v: _convex(u, v, [(-1.15, 0.62), (0.4, 0.62), (1.15, -0.62), (-0.4, -0.62)]),
    "keyhole": lambda u, v: np.minimum(_disc(u, v, 0.0, -0.42, 0.58),
                                       _convex(u, v, [(-0.22, -0.3), (0.22, -0.3), (0.55, 1.1), (-0.55, 1.1)])),
    "teardrop": _teardrop,
    "hourglass": lambda u, v: np.minimum(_convex(u, v, [(-0.85, -1.05), (0.85, -1.05), (0.0, 0.12)]),
                                         _convex(u, v, [(0.0, -0.12), (0.85, 1.05), (-0.85, 1.05)])),
    "trefoil": lambda u, v: _dots(u, v, _around(3, 0.5, -90, 0.12), 0.52),
    "two_dots": lambda u, v: _dots(u, v, [(-0.62, 0.0), (0.62, 0.0)], 0.42),
    "three_dots": lambda u, v: _dots(u, v, _around(3, 0.7, -90, 0.17), 0.4),
    "four_dots": lambda u, v: _dots(u, v, [(x, y) for x in (-0.58, 0.58) for y in (-0.58, 0.58)], 0.36),
}
assert list(_PRETRAIN_SDF) == PRETRAIN_SHAPES and not set(PRETRAIN_SHAPES) & set(SHAPES)


def _bilinear_weights(size, cells):
    """(size, cells) weights that upsample a ``cells``-point grid bilinearly to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    w = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells)[None, :]))
    return w.astype(np.float32)


# --- the renderer --------------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x):
    """SplitMix64's finaliser, elementwise on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _draw_uniforms(indices, seed, lo, hi, stream=0):
    """Uniforms in [0, 1), shape (len(indices), width): row r depends on (seed, indices[r], lo, hi)
    only. A counter-based hash (SplitMix64 over a per-image key and the column number) does in one
    vectorised pass what a per-image ``default_rng`` would do in a Python loop. A non-zero ``stream``
    (``_STREAMS``) is mixed into the key: another sequence of images for every seed; 0 leaves the key
    as it always was."""
    width = _NB + hi * _NO
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & _M64], dtype=np.uint64) * _GOLDEN + np.uint64(0x6B617669))
        if stream:
            key = _mix64(key ^ np.uint64(stream))
        key = _mix64(key ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN))
        key = _mix64(key ^ np.uint64(((lo & 0xFFFFFFFF) << 32) | (hi & 0xFFFFFFFF)))
        cols = (np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix64(key[:, None] + cols) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


# Named columns of the uniforms of one image (:func:`_draw_uniforms`): the background block B (the first
# _NB columns) and, per object slot, the block O (_NO columns). The numbers are part of the generator:
# changing one changes every image (GENERATOR_VERSION).
B_DARK, B_HUE, B_SATURATION, B_VALUE, B_STYLE = 0, 1, 2, 3, 4
B_GRADIENT_ANGLE, B_GRADIENT_AMPLITUDE = 5, 6
B_STRIPE_ANGLE, B_STRIPE_PERIOD, B_STRIPE_PHASE = 7, 8, 9
B_HORIZON, B_FLOOR_SHADE, B_FLOOR_SIGN = 10, 11, 12
B_NOISE_Y, B_N_OBJECTS, B_NOISE_X = 13, 14, 15
B_NOISE_GRID = slice(16, 32)  # the 4×4 control values of the "noise" background
O_KIND, O_COLOUR, O_HUE_JITTER, O_SATURATION, O_VALUE = 0, 1, 2, 3, 4
O_SIZE, O_X, O_Y, O_ROTATION = 5, 6, 7, 8
O_TEXTURE, O_TEXTURE_ANGLE, O_TEXTURE_PERIOD, O_TEXTURE_PHASE = 9, 10, 11, 12
O_DEPTH = 14  # (column 13 is drawn but unused)


def _paint_background(B, S, X, Y):
    """The background of every image, channels first (n, 3, S, S) float32, with what the objects and
    labels need: ``(img, wall, floor, horizon, style, dark)``."""
    n = B.shape[0]
    f32 = np.float32
    # Background: a wall above the horizon and a floor below it (a shade lighter or darker), a
    # style pattern added on top; the depth is farthest at the horizon, so it can be read off.
    dark = B[:, B_DARK] < 0.5
    b_hue, b_sat = B[:, B_HUE], 0.3 * B[:, B_SATURATION]
    b_val = np.where(dark, _DARK_BG[0] + (_DARK_BG[1] - _DARK_BG[0]) * B[:, B_VALUE],
                     _LIGHT_BG[0] + (_LIGHT_BG[1] - _LIGHT_BG[0]) * B[:, B_VALUE])
    wall = hsv_to_rgb(b_hue, b_sat, b_val).astype(f32)
    delta = (0.04 + 0.05 * B[:, B_FLOOR_SHADE]) * np.where(B[:, B_FLOOR_SIGN] < 0.5, -1.0, 1.0)
    floor = hsv_to_rgb(b_hue, b_sat, np.clip(b_val + delta, 0.03, 0.97)).astype(f32)
    horizon = 0.3 + 0.4 * B[:, B_HORIZON]
    h_px = (horizon * S).astype(f32)[:, None, None]
    t = np.clip(Y - h_px + f32(0.5), 0, 1)[:, None]  # (n, 1, S, 1): soft over one pixel
    # channels first: every per-channel plane is contiguous, which halves the painting time
    img = wall[:, :, None, None] * (1 - t) + floor[:, :, None, None] * t
    img = np.broadcast_to(img, (n, 3, S, S)).copy()

    style = np.minimum((B[:, B_STYLE] * len(BACKGROUNDS)).astype(np.int64), len(BACKGROUNDS) - 1)
    field = np.zeros((n, S, S), dtype=f32)
    sel = style == BACKGROUNDS.index("gradient")
    if sel.any():
        a = (2 * math.pi * B[sel, B_GRADIENT_ANGLE]).astype(f32)[:, None, None]
        proj = ((X - S / 2) * np.cos(a) + (Y - S / 2) * np.sin(a)) / f32(S)
        amp = _BG_CONTRAST * (0.5 + 0.5 * B[sel, B_GRADIENT_AMPLITUDE])
        field[sel] = f32(1.4) * amp.astype(f32)[:, None, None] * proj
    sel = style == BACKGROUNDS.index("noise")
    if sel.any():
        G = (B[sel, B_NOISE_GRID].reshape(-1, 4, 4) * 2 - 1).astype(f32)
        w = _bilinear_weights(S, 4)
        # explicit 4-term sums rather than einsum/BLAS: the summation order must not depend on
        # the batch, or pixels would change with the batching
        rows = sum(w[None, :, i, None] * G[:, i, None, :] for i in range(4))      # (m, S, 4)
        coarse = sum(rows[:, :, j, None] * w[None, None, :, j] for j in range(4))  # (m, S, S)
        field[sel] = f32(0.8 * _BG_CONTRAST) * coarse
    sel = style == BACKGROUNDS.index("stripes")
    if sel.any():
        a = (2 * math.pi * B[sel, B_STRIPE_ANGLE]).astype(f32)[:, None, None]
        period = (3.0 + 4.0 * B[sel, B_STRIPE_PERIOD]).astype(f32)[:, None, None]
        phase = (2 * math.pi * B[sel, B_STRIPE_PHASE]).astype(f32)[:, None, None]
        s = X * np.cos(a) + Y * np.sin(a)
        field[sel] = f32(0.5 * _BG_CONTRAST) * np.clip(f32(2.0) * np.sin(f32(2 * math.pi) * s / period + phase), -1, 1)
    img += field[:, None]
    np.clip(img, 0, 1, out=img)
    return img, wall, floor, horizon, style, dark


def _object_params(B, O, S, lo, hi, wall, floor, n_kinds=None) -> dict:
    """Every object slot's parameters (n, hi): presence, kind (index into a vocabulary of ``n_kinds``),
    colours, depth, size, place, rotation, texture."""
    M = hi
    n_obj = lo + np.minimum((B[:, B_N_OBJECTS] * (hi - lo + 1)).astype(np.int64), hi - lo)
    present = np.arange(M)[None, :] < n_obj[:, None]
    n_kinds = len(SHAPES) if n_kinds is None else n_kinds
    kind = np.minimum((O[..., O_KIND] * n_kinds).astype(np.int64), n_kinds - 1)
    colour = np.minimum((O[..., O_COLOUR] * len(COLOURS)).astype(np.int64), len(COLOURS) - 1)
    hue = np.array(list(COLOURS.values()))[colour] + (O[..., O_HUE_JITTER] - 0.5) * 0.05
    rgb = hsv_to_rgb(hue, 0.55 + 0.45 * O[..., O_SATURATION], 0.62 + 0.38 * O[..., O_VALUE])
    # Objects are always lighter than the background, by at least _MIN_CONTRAST in luminance
    # (mixed towards white just enough): random colours on random backgrounds are often nearly
    # invisible, and a polarity that flips between images makes the task slow to learn.
    luma0 = rgb @ _LUMA
    ref = np.maximum(wall @ _LUMA, floor @ _LUMA)[:, None]
    up = np.clip((ref + _MIN_CONTRAST - luma0) / np.maximum(1 - luma0, 1e-6), 0, 1)
    rgb = rgb + (1 - rgb) * up[..., None]
    # the second texture colour: the object's colour moved part of the way towards a grey of the
    # background's luminance, so textures never cut the silhouette apart
    grey = np.broadcast_to(ref[..., None], rgb.shape)
    shade = rgb + (grey - rgb) * _TEXTURE_CONTRAST
    z = OBJECT_DEPTH[0] + (OBJECT_DEPTH[1] - OBJECT_DEPTH[0]) * O[..., O_DEPTH]
    if hi == 1:
        radius = S * (_SIZE[0] + (_SIZE[1] - _SIZE[0]) * O[..., O_SIZE])
        margin = 1.15 * radius  # pointed shapes reach 1.3 radii; a tip may touch the frame
    else:
        # nearer objects look a little larger: apparent size is a depth cue
        radius = S * (0.065 + 0.14 * O[..., O_SIZE]) * (1.3 - 0.15 * (z - OBJECT_DEPTH[0]))
        margin = 0.6 * radius
    cx = margin + (S - 2 * margin) * O[..., O_X]
    cy = margin + (S - 2 * margin) * O[..., O_Y]
    rot = math.radians(_ROTATION) * (2 * O[..., O_ROTATION] - 1)
    texture = np.where(O[..., O_TEXTURE] < 0.5, 0, 1 + np.minimum(((O[..., O_TEXTURE] - 0.5) * 6).astype(np.int64), 2))
    t_angle = math.pi * O[..., O_TEXTURE_ANGLE]
    t_period = np.maximum(3.0, radius * (0.4 + 0.25 * O[..., O_TEXTURE_PERIOD]))
    t_phase = 2 * math.pi * O[..., O_TEXTURE_PHASE]
    kind = np.where(present, kind, -1)

    return dict(n_obj=n_obj, present=present, kind=kind, colour=colour, rgb=rgb, shade=shade, z=z, radius=radius,
                cx=cx, cy=cy, rot=rot, texture=texture, t_angle=t_angle, t_period=t_period, t_phase=t_phase)


def _paint_objects(img, ob: dict, bg_depth, S, X, Y, antialias, return_footprints, kinds=SHAPES):
    """Paint the objects far to near into ``img`` (in place); the per-pixel labels
    ``(mask, instance, depth, footprint, footprints, order)``. ``ob["kind"]`` indexes ``kinds``."""
    n, M = ob["present"].shape
    f32 = np.float32
    present, kind, rgb, shade, z, radius = ob["present"], ob["kind"], ob["rgb"], ob["shade"], ob["z"], ob["radius"]
    cx, cy, rot, texture = ob["cx"], ob["cy"], ob["rot"], ob["texture"]
    t_angle, t_period, t_phase = ob["t_angle"], ob["t_period"], ob["t_phase"]
    mask = np.zeros((n, S, S), dtype=np.int16)
    instance = np.full((n, S, S), -1, dtype=np.int16)
    depth = np.broadcast_to(bg_depth, (n, S, S)).copy()
    footprint = np.zeros((n, M), dtype=np.int64)
    footprints = np.zeros((n, M, S, S), dtype=bool) if return_footprints else None
    key = np.where(present, z, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")  # far to near; absent slots last
    rows = np.arange(n)
    two_pi = f32(2 * math.pi)
    for rank in range(M):
        slot = order[:, rank]
        sel = present[rows, slot]
        if not sel.any():
            continue
        every = bool(sel.all())
        r_sel, j = rows[sel], slot[sel]

        def p(a, rows_=r_sel, j_=j):
            return a[rows_, j_].astype(f32)[:, None, None]

        r = p(radius)
        dx, dy = X - p(cx), Y - p(cy)
        c, s_ = np.cos(p(rot)), np.sin(p(rot))
        u = (dx * c + dy * s_) / r
        v = (dy * c - dx * s_) / r
        d = np.empty(u.shape, dtype=f32)
        k_sel = kind[r_sel, j]
        for k in np.unique(k_sel):
            m = k_sel == k
            d[m] = _sdf(int(k), u[m], v[m], kinds)
        d *= r  # signed distance in pixels
        hard = d <= 0
        alpha = np.clip(f32(0.5) - d, 0, 1) if antialias else hard.astype(f32)

        base = rgb[r_sel, j].astype(f32)
        tex = texture[r_sel, j]
        pat = None
        tm = tex > 0
        if tm.any():
            # textures live in object-local pixel coordinates, so they turn with the object
            rr, tj = r_sel[tm], j[tm]
            ta, per, ph = (p(a, rr, tj) for a in (t_angle, t_period, t_phase))
            lu, lv = u[tm] * r[tm], v[tm] * r[tm]
            s1 = lu * np.cos(ta) + lv * np.sin(ta)
            s2 = lv * np.cos(ta) - lu * np.sin(ta)
            pt = np.empty(lu.shape, dtype=f32)
            tt = tex[tm]
            m = tt == TEXTURES.index("stripes")
            if m.any():
                pt[m] = np.clip(0.5 + 1.5 * np.sin(two_pi * s1[m] / per[m] + ph[m]), 0, 1)
            m = tt == TEXTURES.index("checker")
            if m.any():
                q = np.sin(two_pi * s1[m] / (2 * per[m]) + ph[m]) * np.sin(two_pi * s2[m] / (2 * per[m]))
                pt[m] = np.clip(0.5 + 3.0 * q, 0, 1)
            m = tt == TEXTURES.index("dots")
            if m.any():
                f1 = s1[m] / per[m] + ph[m] / two_pi
                f2 = s2[m] / per[m]
                f1, f2 = f1 - np.round(f1), f2 - np.round(f2)
                pt[m] = np.clip(0.5 - 1.5 * (np.hypot(f1, f2) * per[m] - 0.3 * per[m]), 0, 1)
            pat = np.zeros(u.shape, dtype=f32)
            pat[tm] = pt
            dcol = shade[r_sel, j].astype(f32) - base

        where = slice(None) if every else r_sel
        for ch in range(3):
            plane = img[where, ch]  # a view when every image is painted, else a copy
            col = base[:, ch, None, None]
            if pat is not None:
                col = col + pat * dcol[:, ch, None, None]
            plane += alpha * (col - plane)
            if not every:
                img[r_sel, ch] = plane
        for arr, val in ((mask, (k_sel + 1)), (instance, j), (depth, z[r_sel, j])):
            part = arr[where]
            np.copyto(part, val.astype(arr.dtype)[:, None, None], where=hard)
            if not every:
                arr[r_sel] = part
        footprint[r_sel, j] = hard.sum(axis=(1, 2))
        if footprints is not None:
            footprints[r_sel, j] = hard

    return mask, instance, depth, footprint, footprints, order


def _render_chunk(U, size, lo, hi, noise, antialias, return_footprints, kinds=SHAPES):
    n, S, M = U.shape[0], size, hi
    f32 = np.float32
    B = U[:, :_NB]
    O = U[:, _NB:].reshape(n, M, _NO)
    X = (np.arange(S, dtype=f32) + f32(0.5))[None, None, :]  # (1, 1, S) pixel centres
    Y = (np.arange(S, dtype=f32) + f32(0.5))[None, :, None]  # (1, S, 1)

    img, wall, floor, horizon, style, dark = _paint_background(B, S, X, Y)
    bg_depth = background_depth(horizon, S)[:, :, None]  # (n, S, 1): constant along rows
    ob = _object_params(B, O, S, lo, hi, wall, floor, len(kinds))
    mask, instance, depth, footprint, footprints, order = _paint_objects(img, ob, bg_depth, S, X, Y, antialias,
                                                                          return_footprints, kinds)
    present, kind, colour, texture, z = ob["present"], ob["kind"], ob["colour"], ob["texture"], ob["z"]

    if noise > 0:
        oy = (B[:, B_NOISE_Y] * _NOISE_BANK).astype(np.int64)
        ox = (B[:, B_NOISE_X] * _NOISE_BANK).astype(np.int64)
        img += f32(noise) * noise_windows(S)[oy, ox]
    image = np.clip(img * f32(255) + f32(0.5), 0, 255).astype(np.uint8)  # (n, 3, S, S)

    visible = (instance[:, None, :, :] == np.arange(M)[None, :, None, None]).sum(axis=(2, 3))
    visible_fraction = np.where(footprint > 0, visible / np.maximum(footprint, 1), 0.0)
    tiny = footprint < TINY_FRACTION * S * S
    difficult = present & (tiny | (visible_fraction < VISIBLE_FRACTION))

    out = {
        "image": image,
        "mask": mask,
        "depth": depth,
        "instance": instance,
        "n_objects": ob["n_obj"],
        "present": present,
        "kind": kind,
        "colour": np.where(present, colour, -1),
        "rgb": ob["rgb"].astype(f32),
        "x": ob["cx"],
        "y": ob["cy"],
        "radius": ob["radius"],
        "rotation": np.degrees(ob["rot"]),
        "texture": np.where(present, texture, -1),
        "z": np.where(present, z, np.inf),
        "order": order,
        "footprint": footprint,
        "visible": visible,
        "visible_fraction": visible_fraction,
        "difficult": difficult,
        "dark_background": dark,
        "background": style,
        "horizon": horizon,
        "background_rgb": wall,
    }
    if footprints is not None:
        out["footprints"] = footprints
    return out


def render_scenes(
    indices,
    seed: int = 0,
    size: int = 32,
    n_objects: tuple[int, int] = (1, 1),
    *,
    noise: float = 0.025,
    antialias: bool = True,
    return_footprints: bool = False,
    vocabulary: str = "notebook",
) -> dict:
    """Render images ``indices`` of generator ``seed``; every array's first axis follows ``indices``.

    Parameters
    ----------
    indices : int (= ``range(indices)``) or sequence of non-negative ints.
    n_objects : ``(lo, hi)``, each image holds ``lo..hi`` objects (uniformly).
    noise : standard deviation of the additive pixel noise, in [0, 1] intensity units.
    return_footprints : also return ``footprints`` (n, hi, H, W) bool, every object's full
        (unoccluded) coverage -- for tests and occlusion figures.
    vocabulary : the kinds the objects are drawn from (``VOCABULARIES``): ``"notebook"`` =
        ``SHAPES`` (the default; the notebooks' tasks) or ``"pretrain"`` = ``PRETRAIN_SHAPES`` (the
        pretraining world, which also draws its uniforms from its own stream: other backgrounds,
        colours and places for the same seed and index). ``kind`` and ``mask`` index it.

    Returns a dict of NumPy arrays (n images, M = ``hi`` object slots, absent slots marked):

    - ``image`` uint8 (n, H, W, 3); ``mask`` int16 (n, H, W), 0 = background, k + 1 = ``SHAPES[k]``
      (``PRETRAIN_SHAPES[k]`` with ``vocabulary="pretrain"``; :func:`scenes` stores it as int64);
      ``depth`` float32 (n, H, W): the background's depth (:func:`background_depth`: 6 at the
      top/bottom edge to 10 at the horizon) or the depth of the nearest object (1..4); ``instance``
      int16 (n, H, W), the visible object slot or -1.
    - per object (n, M): ``present``, ``kind`` (-1 if absent), ``colour`` (index into
      ``COLOURS``), ``rgb`` (n, M, 3), ``x``, ``y``, ``radius`` (pixels), ``rotation`` (degrees),
      ``texture`` (index into ``TEXTURES``), ``z`` (depth, inf if absent), ``footprint`` and
      ``visible`` (pixel counts), ``visible_fraction``, ``difficult`` (footprint below
      ``TINY_FRACTION`` of the image, or less than ``VISIBLE_FRACTION`` of it visible);
      ``order`` (n, M): slots from the farthest to the nearest (the painting order).
    - per image (n,): ``n_objects``, ``dark_background``, ``background`` (index into
      ``BACKGROUNDS``), ``horizon`` (fraction of the height), ``background_rgb`` (n, 3), ``index``.

    Pixels are painted far to near with anti-aliased edges (``antialias=False``: hard edges); a
    pixel belongs to an object (mask, depth, instance) where the object's coverage is at least one
    half, i.e. where its signed distance is <= 0, so the mask follows what is painted on top.
    """
    seed = check_seed(seed)
    size = _check_size(size)
    kinds, stream = _vocabulary(vocabulary)
    if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
        indices = range(_check_n(indices))
    idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError("indices must be an int or a 1-D sequence of non-negative ints")
    idx = idx.astype(np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError(f"indices must be non-negative, got {int(idx.min())}")
    try:
        lo, hi = (int(v) for v in n_objects)
    except (TypeError, ValueError):
        raise ValueError(f"n_objects must be a pair (lo, hi) of ints, got {n_objects!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"n_objects must satisfy 1 <= lo <= hi, got {n_objects!r}")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")

    chunk = max(16, _CHUNK_PIXELS // (size * size))
    out = None
    for start in range(0, max(len(idx), 1), chunk):
        part_idx = idx[start:start + chunk]
        U = _draw_uniforms(part_idx, seed, lo, hi, stream)
        part = _render_chunk(U, size, lo, hi, float(noise), antialias, return_footprints, kinds)
        if out is None:  # allocate once: concatenating chunk results costs as much as rendering
            out = {k: np.empty((len(idx),) + v.shape[1:], dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][start:start + len(part_idx)] = v
    out["image"] = out["image"].transpose(0, 2, 3, 1)  # (n, H, W, 3) view of channels-first data
    out["index"] = idx
    return out


# --- dataset views -------------------------------------------------------------------------------

def _object_meta(r, slot=0, kinds_of=SHAPES):
    import pandas as pd

    names = list(COLOURS)
    kinds = r["kind"][:, slot]
    return pd.DataFrame({
        "index": r["index"],
        "shape": [kinds_of[k] for k in kinds],
        "label": kinds,
        "colour": [names[c] for c in r["colour"][:, slot]],
        "texture": [TEXTURES[t] for t in r["texture"][:, slot]],
        "radius": r["radius"][:, slot],
        "x": r["x"][:, slot],
        "y": r["y"][:, slot],
        "rotation": r["rotation"][:, slot],
        "background": [BACKGROUNDS[b] for b in r["background"]],
        "dark_background": r["dark_background"],
        "horizon": r["horizon"],
    })


def _single(n, seed, size, vocabulary="notebook"):
    n, seed, size = _check_n(n), check_seed(seed), _check_size(size)
    return render_scenes(range(n), seed, size, (1, 1), vocabulary=vocabulary)


def _to_chw(image):
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))


def shapes(n: int = 6000, seed: int = 0, size: int = 32) -> ImageDataset:
    """Single-object classification: ``n`` RGB images ``size``x``size``, label = index into ``SHAPES``.

    A small CNN reaches roughly 80-95 % validation accuracy in a few epochs on 5,000 images
    (32x32, 10 classes). ``meta`` holds the generation parameters of every image.
    """
    import torch

    r = _single(n, seed, size)
    return ImageDataset(
        _to_chw(r["image"]),
        torch.from_numpy(r["kind"][:, 0].copy()),
        classes=list(SHAPES),
        name="shapes",
        meta=_object_meta(r),
        fingerprint=digest(("shapes", GENERATOR_VERSION, n, seed, size)),
        info={"task": "classification", "generator": "kaviz.data.synthetic.render_scenes",
              "seed": seed, "size": size},
    )


def pretraining(n: int = 20000, seed: int = 0, size: int = 32) -> ImageDataset:
    """The pretraining world's classification task: ``n`` RGB images ``size``x``size`` with one
    object each, label = index into ``PRETRAIN_SHAPES`` (``classes``; 30 kinds, none of them in
    ``SHAPES``). Colours, textures, backgrounds, sizes, places and rotations are drawn as for
    :func:`shapes`, from the pretraining vocabulary's own stream of uniforms (so ``pretraining(seed=s)``
    and ``shapes(seed=s)`` share neither outlines nor draws). ``meta`` holds the generation
    parameters of every image, as for :func:`shapes`. For pretraining the zoo's CPU backbones.
    """
    import torch

    r = _single(n, seed, size, "pretrain")
    return ImageDataset(
        _to_chw(r["image"]),
        torch.from_numpy(r["kind"][:, 0].copy()),
        classes=list(PRETRAIN_SHAPES),
        name="pretraining",
        meta=_object_meta(r, kinds_of=PRETRAIN_SHAPES),
        fingerprint=digest(("pretraining", GENERATOR_VERSION, _PRETRAIN_TAG, n, seed, size)),
        info={"task": "classification", "generator": "kaviz.data.synthetic.render_scenes",
              "vocabulary": "pretrain", "seed": seed, "size": size},
    )


def _attributes(r, size):
    names = list(COLOURS)
    kinds = r["kind"][:, 0]
    colour = r["colour"][:, 0]
    S = size
    lo, hi = S * _SIZE[0], S * _SIZE[1]
    cols = {
        "warm_colour": np.isin(colour, [names.index(c) for c in _WARM]),
        "large": r["radius"][:, 0] >= (lo + hi) / 2,
        "textured": r["texture"][:, 0] > 0,
        "on_left": r["x"][:, 0] < S / 2,
        "on_top": r["y"][:, 0] < S / 2,
        "dark_background": r["dark_background"],
        "round": np.isin(kinds, [SHAPES.index(k) for k in _ROUND]),
        "pointy": np.isin(kinds, [SHAPES.index(k) for k in _POINTY]),
    }
    assert list(cols) == ATTRIBUTES
    return np.stack([cols[a] for a in ATTRIBUTES], axis=1).astype(np.int64)


def shape_attributes(n: int = 6000, seed: int = 0, size: int = 32) -> ImageDataset:
    """The images of :func:`shapes` (same ``n``/``seed``/``size``, pixel for pixel) with binary
    attribute targets: int64 (n, A) of 0/1, ``classes = ATTRIBUTES`` (A = 8), each derived from the
    generation parameters (see ``ATTRIBUTES``). Stand-in for CelebA attributes (SPEC.md §5)."""
    import torch

    r = _single(n, seed, size)
    bits = _attributes(r, size)
    meta = _object_meta(r)
    for a, col in zip(ATTRIBUTES, bits.T):
        meta[a] = col
    return ImageDataset(
        _to_chw(r["image"]),
        torch.from_numpy(bits),
        classes=list(ATTRIBUTES),
        name="shape_attributes",
        meta=meta,
        fingerprint=digest(("shape_attributes", GENERATOR_VERSION, n, seed, size)),
        info={"task": "attributes", "attributes": list(ATTRIBUTES), "seed": seed, "size": size,
              "generator": "kaviz.data.synthetic.render_scenes"},
    )


def scenes(n: int = 3000, seed: int = 0, size: int = 48, max_objects: int = 4, *,
           normals: bool = False) -> ImageDataset:
    """Multi-object scenes with 1..``max_objects`` objects at random depths.

    ``targets`` is a dict (K = ``len(SHAPES)``):

    - ``labels`` float32 (n, K) multi-hot: the classes present;
    - ``difficult`` bool (n, K): present, but every instance tiny (< ``TINY_FRACTION`` of the
      image) or mostly occluded (< ``VISIBLE_FRACTION`` visible) -- VOC's flag;
    - ``mask`` int64 (n, H, W): 0 = background, k + 1 = ``SHAPES[k]`` (``info["mask_classes"]``);
    - ``depth`` float32 (n, H, W): objects 1..4, background 6..10 (farthest at the horizon);
    - ``normals`` float32 (n, 3, H, W), only with ``normals=True``: unit surface normals derived
      from ``depth`` with the visible objects as separate surfaces (:func:`depth_normals`: x right,
      y down, z towards the camera). The objects face the camera, (0, 0, 1); the background above
      the horizon leans down and the floor below it up (no x component anywhere). Nothing else
      changes: the images, masks and depth are the same with and without it (no extra random
      numbers), only the fingerprint tells the two datasets apart.

    ``meta`` has one row per image; ``info["objects"]`` one row per object, keyed by the
    generator ``index`` (so it stays valid for subsets).
    """
    return _scene_dataset(n, seed, size, max_objects, normals, "notebook")


def pretraining_scenes(n: int = 3000, seed: int = 0, size: int = 48, max_objects: int = 4, *,
                       normals: bool = False) -> ImageDataset:
    """The multi-object scenes of :func:`scenes` over the pretraining vocabulary: the same targets
    (``labels``/``difficult`` (n, K) with K = ``len(PRETRAIN_SHAPES)``, ``mask`` 0 = background,
    k + 1 = ``PRETRAIN_SHAPES[k]``, ``depth``, and ``normals`` with ``normals=True``), ``meta`` and
    ``info``, drawn from the pretraining vocabulary's own stream (:func:`render_scenes` with
    ``vocabulary="pretrain"``). For pretraining dense (encoder-decoder) backbones.
    """
    return _scene_dataset(n, seed, size, max_objects, normals, "pretrain")


def _scene_dataset(n, seed, size, max_objects, normals, vocabulary) -> ImageDataset:
    """:func:`scenes` (``vocabulary="notebook"``) or :func:`pretraining_scenes` (``"pretrain"``)."""
    import pandas as pd
    import torch

    n, seed, size = _check_n(n), check_seed(seed), _check_size(size)
    if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)) or max_objects < 1:
        raise ValueError(f"max_objects must be an int >= 1, got {max_objects!r}")
    if not isinstance(normals, (bool, np.bool_)):
        raise ValueError(f"normals must be True or False (add the surface-normal map), got {normals!r}")
    kinds_of, _ = _vocabulary(vocabulary)
    r = render_scenes(range(n), seed, size, (1, int(max_objects)), vocabulary=vocabulary)
    K = len(kinds_of)
    labels = np.zeros((n, K), dtype=np.float32)
    easy = np.zeros((n, K), dtype=bool)
    rows, slots = np.nonzero(r["present"])
    kinds = r["kind"][rows, slots]
    labels[rows, kinds] = 1.0
    ok = ~r["difficult"][rows, slots]
    easy[rows[ok], kinds[ok]] = True
    difficult = (labels > 0) & ~easy  # all instances of the class are difficult

    names = list(COLOURS)
    objects = pd.DataFrame({
        "index": r["index"][rows],
        "slot": slots,
        "shape": [kinds_of[k] for k in kinds],
        "colour": [names[c] for c in r["colour"][rows, slots]],
        "texture": [TEXTURES[t] for t in r["texture"][rows, slots]],
        "radius": r["radius"][rows, slots],
        "x": r["x"][rows, slots],
        "y": r["y"][rows, slots],
        "depth": r["z"][rows, slots],
        "visible_fraction": r["visible_fraction"][rows, slots],
        "difficult": r["difficult"][rows, slots],
    })
    meta = pd.DataFrame({
        "index": r["index"],
        "n_objects": r["n_objects"],
        "shapes": [",".join(kinds_of[k] for k in ks if k >= 0) for ks in r["kind"]],
        "n_difficult": r["difficult"].sum(axis=1),
        "background": [BACKGROUNDS[b] for b in r["background"]],
        "dark_background": r["dark_background"],
        "horizon": r["horizon"],
    })
    targets = {
        "labels": torch.from_numpy(labels),
        "difficult": torch.from_numpy(difficult),
        "mask": torch.from_numpy(r["mask"]),
        "depth": torch.from_numpy(r["depth"]),
    }
    if vocabulary == "notebook":
        name, key, info = "scenes", ("scenes", GENERATOR_VERSION, n, seed, size, int(max_objects)), {}
    else:
        name = "pretraining_scenes"
        key = (name, GENERATOR_VERSION, _PRETRAIN_TAG, n, seed, size, int(max_objects))
        info = {"vocabulary": vocabulary}
    if normals:
        targets["normals"] = torch.from_numpy(depth_normals(r["depth"], r["instance"]))
        key += ("normals", NORMALS_VIEW_WIDTH)
        info["normals"] = "kaviz.data.synthetic.depth_normals (x right, y down, z towards the camera)"
    return ImageDataset(
        _to_chw(r["image"]),
        targets,
        classes=list(kinds_of),
        name=name,
        meta=meta,
        fingerprint=digest(key),
        info={"task": "scene", "mask_classes": ["background", *kinds_of], "objects": objects,
              "background_depth_range": BACKGROUND_DEPTH, "object_depth_range": OBJECT_DEPTH,
              "seed": seed, "size": size, "max_objects": int(max_objects),
              "generator": "kaviz.data.synthetic.render_scenes", **info},
    )
