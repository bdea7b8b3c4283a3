"""ShapesWorld: a seeded procedural generator of scenes with exact ground truth.

ShapesWorld is the default data of every model in this project (design.md §7): LaVin-DiT's in-context tasks
(``train/data/lavin_tasks.py``), and later CRIS (referring expressions) and Unpair-Seg (SA-1B-like masks, captions).
Everything about scene ``i`` depends only on the world's settings and ``(seed, i)``: the generator draws from numpy
Generators seeded with ``SeedSequence([seed, stream, i])`` and never touches a global RNG.

Scene model
-----------
* A **background**: a smooth two-colour gradient along a random direction plus a low-frequency texture (a sum of a few
  sinusoids), kept dim and low-saturated so that it never looks like a palette colour.
* **Objects**, each an :class:`ObjectSpec`: ``category`` (:data:`CATEGORIES`), ``colour`` (a name in :data:`PALETTE`),
  ``size`` class (:data:`SIZES`), ``radius`` (fraction of ``S = min(H, W)``; every shape fits in the circle of that
  radius), ``center`` ``(x, y)`` as fractions of ``(W, H)``, ``angle`` (radians, counter-clockwise on screen; only
  triangles, ellipses and stars rotate, so that a rotated square never looks like a diamond), ``depth`` (distance in
  ``[0, 1]``) and ``slope`` (the object's depth plane tilt).
* **Painter's order**: objects are stored and drawn farthest first, so object index ``j`` occludes every index below
  it. Instance ids are ``j + 1`` (0 is the background).

Coordinates: pixel ``(row y, column x)`` covers ``[x, x+1) x [y, y+1)``; its centre is ``(x + 0.5, y + 0.5)``.

Rendering and ground truth
--------------------------
Each pixel is supersampled on an ``s x s`` grid (``s = supersample``). A subsample shows the nearest object that
contains it, else the background. From the subsample labels:

* ``image`` [H, W, 3] float32 in [0, 1]: the mean colour of the subsamples (antialiased edges; a pixel fully covered
  by one object has exactly that object's palette colour). The background, being smooth, is evaluated once per pixel
  at its centre.
* ``coverage`` [N + 1, H, W] float32: the fraction of each pixel's subsamples showing the background (index 0) or
  object ``j`` (index ``j + 1``); ``amodal`` [N, H, W]: the same for each object ignoring occlusion.
* ``instance`` [H, W] int32: the label with the largest coverage (ties go to the lower label), so the visible instance
  masks ``instance == j + 1`` are disjoint and their union is exactly ``foreground = instance > 0``.
* ``depth`` [H, W] float32 in [0, 1], a distance (0 near, 1 far), from the visible label at the pixel centre: object
  ``j`` is the plane ``depth_j + slope_x (x - cx) / S + slope_y (y - cy) / S``; the background is the farthest surface,
  a floor-like plane from :data:`BACKGROUND_DEPTH` [1] at the top row to [0] at the bottom. Object depths are distinct
  levels of :data:`DEPTH_LEVELS` whose spacing exceeds any plane's variation, so a nearer object is nearer at every
  pixel, and painter's order equals depth order.
* ``edges`` [H, W] bool: the inner boundary of every instance mask: object pixels with a 4-neighbour (inside the image)
  of another label. This holds the boundary of the foreground as well.
* ``boxes`` [N, 4] int64 ``(x0, y0, x1, y1)``, end-exclusive, tight around each visible mask (``-1`` for an empty
  mask, which only clips can have).

Language
--------
Every scene describes its objects: :meth:`Scene.expressions` lists referring expressions (a structured
:class:`Expression` plus its text, e.g. "the large red circle", "the leftmost square", "the blue square left of the
green triangle") each of which picks out exactly one object under the semantics below, and :meth:`Scene.expression`
gives the preferred one (attributes only, fewest words; else a superlative; else a relation), or a flagged ambiguous
description when there is none. :meth:`Scene.caption` and :meth:`Scene.object_caption` give captions ("a large red
circle in the top left").

Semantics (on object centres in pixels, margin ``m = RELATION_MARGIN * S``): "A left of B" iff ``A.x < B.x - m``
("right of", "above" (smaller y), "below" likewise); "the leftmost D" is the object matching description D whose x is
smaller than every other match's x by more than ``m``. A description matches an object iff every word it names (size,
colour, category) equals the object's. Positions are geometric centres, not mask centroids, so they stay defined for
an object that a clip frame hides completely.

Video
-----
:meth:`ShapesWorld.clip` moves scene ``i``'s objects on straight lines with constant velocity, bouncing off the
image borders; frame 0 is bitwise ``scene(i)``; identities, depth order and the background stay fixed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Optional, Sequence

import numpy as np

CATEGORIES = ("circle", "square", "triangle", "ellipse", "star", "cross")
ROTATING = frozenset({"triangle", "ellipse", "star"})

# Saturated or bright colours, all channels in (0, 1]: never pure black (the inpainting hole) nor background-like.
PALETTE = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.97, 0.97, 0.97),
}

# Radius ranges as fractions of S = min(H, W); the gaps between classes keep the size words unambiguous to a viewer.
SIZES = {"small": (0.08, 0.11), "medium": (0.13, 0.17), "large": (0.20, 0.25)}

DEPTH_LEVELS = tuple(float(v) for v in np.linspace(0.1, 0.8, 24))
MAX_SLOPE = 0.02  # |slope| bound: over radius <= 0.25 a plane strays < 0.011 from its level, < half the spacing
BACKGROUND_DEPTH = (0.87, 1.0)  # background distance at the bottom and top rows
RELATION_MARGIN = 0.05
RELATIONS = ("left of", "right of", "above", "below")
SUPERLATIVES = ("leftmost", "rightmost", "topmost", "bottommost")

_ELLIPSE_MINOR = 0.55
_SQUARE_HALF = 0.7
_CROSS_ARM, _CROSS_HALF_WIDTH = 0.9, 0.3
_STAR_INNER = 0.45
_PLACEMENT = 0.8  # object centres keep this many radii from the image border
_MAX_ATTEMPTS = 60  # layouts tried per object count before trying one object fewer
_LAYOUT_SIDE = 64  # short side of the resolution at which layouts are checked for visibility
_SCENE_STREAM, _MOTION_STREAM = 0, 1
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# ---------------------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ObjectSpec:
    """One object, in resolution-free units (see the module docstring); the same spec renders at any size."""

    category: str
    colour: str
    size: str
    radius: float
    center: tuple[float, float]
    angle: float = 0.0
    depth: float = 0.5
    slope: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"ObjectSpec: 'category' must be one of {CATEGORIES}, got {self.category!r}")
        if self.colour not in PALETTE:
            raise ValueError(f"ObjectSpec: 'colour' must be one of {tuple(PALETTE)}, got {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"ObjectSpec: 'size' must be one of {tuple(SIZES)}, got {self.size!r}")
        if not (0 < self.radius <= 0.5):
            raise ValueError(f"ObjectSpec: 'radius' must be in (0, 0.5] (a fraction of min(H, W)), got {self.radius}")
        if not (0 <= self.depth <= 1):
            raise ValueError(f"ObjectSpec: 'depth' must be in [0, 1], got {self.depth}")

    @property
    def rgb(self) -> tuple[float, float, float]:
        return PALETTE[self.colour]


@dataclass(frozen=True)
class Background:
    """Gradient from ``colour0`` to ``colour1`` along ``direction`` (radians) plus ``waves``: (cycles per image,
    orientation, phase, amplitude) sinusoids added to every channel; values are clipped to [0.05, 0.75]."""

    colour0: tuple[float, float, float] = (0.3, 0.3, 0.3)
    colour1: tuple[float, float, float] = (0.4, 0.4, 0.4)
    direction: float = 0.0
    waves: tuple[tuple[float, float, float, float], ...] = ()

    def evaluate(self, x: np.ndarray, y: np.ndarray, width: int, height: int) -> np.ndarray:
        """Colour [..., 3] (float64) at pixel-unit points ``x``, ``y`` (broadcast together)."""
        u, v = x / width - 0.5, y / height - 0.5
        t = np.clip(0.5 + u * math.cos(self.direction) + v * math.sin(self.direction), 0.0, 1.0)
        tex = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)))
        for freq, orient, phase, amp in self.waves:
            tex = tex + amp * np.sin(2 * math.pi * freq * (u * math.cos(orient) + v * math.sin(orient)) + phase)
        c0, c1 = np.asarray(self.colour0), np.asarray(self.colour1)
        out = c0 * (1 - t)[..., None] + c1 * t[..., None] + tex[..., None]
        return np.clip(out, 0.05, 0.75)


# ---------------------------------------------------------------------------------------------------------------------
# Language


@dataclass(frozen=True)
class Description:
    """A noun phrase: the category plus optional size and colour words."""

    category: str
    colour: Optional[str] = None
    size: Optional[str] = None

    @property
    def text(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.category) if w)

    def matches(self, spec: ObjectSpec) -> bool:
        return (spec.category == self.category and (self.colour is None or spec.colour == self.colour)
                and (self.size is None or spec.size == self.size))


@dataclass(frozen=True)
class Expression:
    """A referring expression in structured form. ``text`` renders it; :meth:`Scene.resolve` evaluates it.

    ``target``: the object index it was made for. ``superlative``: one of :data:`SUPERLATIVES` or None.
    ``relation`` and ``anchor``: one of :data:`RELATIONS` and the anchor's description (``anchor_index`` its object).
    ``ambiguous``: True when the scene has no unique expression for the target (this one matches several objects).
    """

    target: int
    subject: Description
    superlative: Optional[str] = None
    relation: Optional[str] = None
    anchor: Optional[Description] = None
    anchor_index: Optional[int] = None
    ambiguous: bool = False

    @property
    def text(self) -> str:
        words = ["the"] + ([self.superlative] if self.superlative else []) + [self.subject.text]
        if self.relation is not None:
            words += [self.relation, "the", self.anchor.text]
        return " ".join(words)


def _region(x: float, y: float, width: int, height: int) -> str:
    col = "left" if x < width / 3 else ("right" if x > 2 * width / 3 else "centre")
    row = "top" if y < height / 3 else ("bottom" if y > 2 * height / 3 else "middle")
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


# ---------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True, eq=False)
class SceneObject:
    """A rendered object: its spec plus the pixel-level ground truth of its scene."""

    index: int
    spec: ObjectSpec
    mask: np.ndarray  # bool [H, W], visible (after occlusion)
    amodal: np.ndarray  # bool [H, W], the whole shape (coverage > 0.5) ignoring occlusion
    box: Optional[tuple[int, int, int, int]]  # (x0, y0, x1, y1) end-exclusive, tight around mask; None if empty
    center_px: tuple[float, float]  # (x, y) in pixels
    radius_px: float

    @property
    def id(self) -> int:
        return self.index + 1

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def category(self) -> str:
        return self.spec.category

    @property
    def colour(self) -> str:
        return self.spec.colour

    @property
    def size(self) -> str:
        return self.spec.size

    @property
    def depth(self) -> float:
        return self.spec.depth

    @property
    def rgb(self) -> tuple[float, float, float]:
        return self.spec.rgb


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene (see the module docstring for every field's definition)."""

    size: tuple[int, int]
    specs: tuple[ObjectSpec, ...]
    background: Background
    image: np.ndarray  # float32 [H, W, 3] in [0, 1]
    coverage: np.ndarray  # float32 [N + 1, H, W]
    amodal: np.ndarray  # float32 [N, H, W]
    instance: np.ndarray  # int32 [H, W]
    depth: np.ndarray  # float32 [H, W]
    edges: np.ndarray  # bool [H, W]

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]

    @property
    def foreground(self) -> np.ndarray:
        return self.instance > 0

    @cached_property
    def masks(self) -> np.ndarray:
        """bool [N, H, W] visible instance masks, painter's order."""
        return self.instance[None] == np.arange(1, len(self.specs) + 1)[:, None, None]

    @cached_property
    def boxes(self) -> np.ndarray:
        """int64 [N, 4] (x0, y0, x1, y1), end-exclusive; -1 for an empty mask."""
        out = np.full((len(self.specs), 4), -1, dtype=np.int64)
        for j, m in enumerate(self.masks):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if rows.size:
                out[j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        return out

    @cached_property
    def objects(self) -> tuple[SceneObject, ...]:
        h, w = self.size
        s = min(h, w)
        return tuple(SceneObject(
            index=j, spec=sp, mask=self.masks[j], amodal=self.amodal[j] > 0.5,
            box=None if self.boxes[j, 0] < 0 else tuple(int(v) for v in self.boxes[j]),
            center_px=(sp.center[0] * w, sp.center[1] * h), radius_px=sp.radius * s)
            for j, sp in enumerate(self.specs))

    # -- language -----------------------------------------------------------------------------------------------------

    def _xy(self) -> np.ndarray:
        return np.array([[sp.center[0] * self.width, sp.center[1] * self.height] for sp in self.specs]).reshape(-1, 2)

    def _margin(self) -> float:
        return RELATION_MARGIN * min(self.size)

    def relation_holds(self, relation: str, a: int, b: int) -> bool:
        """Whether object ``a`` is ``relation`` (one of :data:`RELATIONS`) object ``b``."""
        xy, m = self._xy(), self._margin()
        if relation == "left of":
            return bool(xy[a, 0] < xy[b, 0] - m)
        if relation == "right of":
            return bool(xy[a, 0] > xy[b, 0] + m)
        if relation == "above":
            return bool(xy[a, 1] < xy[b, 1] - m)
        if relation == "below":
            return bool(xy[a, 1] > xy[b, 1] + m)
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")

    def _extreme(self, superlative: str, candidates: Sequence[int]) -> Optional[int]:
        """The candidate that is the ``superlative`` one by more than the margin, or None."""
        if superlative not in SUPERLATIVES:
            raise ValueError(f"superlative must be one of {SUPERLATIVES}, got {superlative!r}")
        if not candidates:
            return None
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[superlative]
        key = sign * self._xy()[list(candidates), axis]
        order = np.argsort(key, kind="stable")
        if len(candidates) > 1 and not key[order[1]] - key[order[0]] > self._margin():
            return None
        return list(candidates)[int(order[0])]

    def matching(self, description: Description) -> list[int]:
        return [j for j, sp in enumerate(self.specs) if description.matches(sp)]

    def resolve(self, expression: Expression) -> list[int]:
        """The objects that ``expression`` denotes under the documented semantics (one for a valid expression)."""
        cands = self.matching(expression.subject)
        if expression.relation is not None:
            anchors = self.matching(expression.anchor)
            if len(anchors) != 1:
                return []
            cands = [j for j in cands if self.relation_holds(expression.relation, j, anchors[0])]
        if expression.superlative is not None:
            best = self._extreme(expression.superlative, cands)
            return [] if best is None else [best]
        return cands

    def _descriptions(self, j: int) -> list[Description]:
        sp = self.specs[j]
        return [Description(sp.category), Description(sp.category, colour=sp.colour),
                Description(sp.category, size=sp.size), Description(sp.category, colour=sp.colour, size=sp.size)]

    def _unique_description(self, j: int) -> Optional[Description]:
        for d in self._descriptions(j):
            if self.matching(d) == [j]:
                return d
        return None

    def expressions(self, j: int) -> list[Expression]:
        """Every unique referring expression for object ``j`` that the grammar makes: attribute descriptions (shortest
        first), then superlatives over an ambiguous description, then relations to an object that has a unique
        attribute description. Each one resolves to exactly ``[j]``."""
        if not 0 <= j < len(self.specs):
            raise IndexError(f"object index {j} out of range for a scene with {len(self.specs)} objects")
        out = [Expression(j, d) for d in self._descriptions(j) if self.matching(d) == [j]]
        for d in self._descriptions(j):
            cands = self.matching(d)
            if len(cands) < 2:
                continue
            out += [Expression(j, d, superlative=s) for s in SUPERLATIVES if self._extreme(s, cands) == j]
        for a in range(len(self.specs)):
            anchor = self._unique_description(a) if a != j else None
            if anchor is None:
                continue
            for d in self._descriptions(j):
                for rel in RELATIONS:
                    e = Expression(j, d, relation=rel, anchor=anchor, anchor_index=a)
                    if self.resolve(e) == [j]:
                        out.append(e)
        return out

    def expression(self, j: int) -> Expression:
        """The first of :meth:`expressions`, or the full attribute description flagged ``ambiguous``."""
        exprs = self.expressions(j)
        if exprs:
            return exprs[0]
        return Expression(j, self._descriptions(j)[-1], ambiguous=True)

    def object_caption(self, j: int) -> str:
        sp = self.specs[j]
        x, y = self._xy()[j]
        return f"a {sp.size} {sp.colour} {sp.category} {_region(x, y, self.width, self.height)}"

    def caption(self) -> str:
        """E.g. "two shapes: a large red circle in the top left and a small blue star at the bottom."""
        n = len(self.specs)
        if n == 0:
            return "an empty scene."
        parts = [self.object_caption(j) for j in range(n)]
        listing = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        count = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
        return f"{count} shape{'s' if n != 1 else ''}: {listing}."


@dataclass(frozen=True, eq=False)
class Clip:
    """``frames`` rendered scenes of one moving-object clip; object ``j`` is the same object in every frame.
    ``velocity`` [N, 2]: each object's (dx, dy) per frame in pixels before bouncing."""

    frames: tuple[Scene, ...]
    velocity: np.ndarray

    @property
    def video(self) -> np.ndarray:
        """float32 [T, H, W, 3] in [0, 1]."""
        return np.stack([f.image for f in self.frames])

    @property
    def instance(self) -> np.ndarray:
        return np.stack([f.instance for f in self.frames])

    @property
    def masks(self) -> np.ndarray:
        """bool [T, N, H, W]."""
        return np.stack([f.masks for f in self.frames])


# ---------------------------------------------------------------------------------------------------------------------
# Rasterization


def _inside(category: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape for unit-radius shapes in object coordinates (already un-rotated)."""
    if category == "circle":
        return u * u + v * v <= 1.0
    if category == "ellipse":
        return u * u + (v / _ELLIPSE_MINOR) ** 2 <= 1.0
    if category == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF
    if category == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_ARM) & (av <= _CROSS_HALF_WIDTH)) | ((au <= _CROSS_HALF_WIDTH) & (av <= _CROSS_ARM))
    if category == "triangle":
        # Equilateral, circumradius 1, a vertex pointing up (-y); inside all three edges (inradius 0.5).
        ok = np.ones(np.shape(u), dtype=bool)
        for k in range(3):
            th = -math.pi / 2 + math.pi / 3 + 2 * math.pi * k / 3
            ok &= u * math.cos(th) + v * math.sin(th) <= 0.5
        return ok
    if category == "star":
        # Fold the angle into one half-spike [0, pi/5] measured from a tip (pointing up), then test the side of the
        # tip -> inner-vertex segment that the origin lies on.
        phi = np.arctan2(v, u) + math.pi / 2
        sector = 2 * math.pi / 5
        psi = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)
        rho = np.hypot(u, v)
        px, py = rho * np.cos(psi), rho * np.sin(psi)
        ix, iy = _STAR_INNER * math.cos(math.pi / 5), _STAR_INNER * math.sin(math.pi / 5)
        # cross((I - T), (P - T)) with T = (1, 0); the origin gives cross((I - T), -T) = iy > 0.
        return (ix - 1.0) * py - iy * (px - 1.0) >= 0.0
    raise ValueError(f"unknown category {category!r}")


@lru_cache(maxsize=8)
def _pixel_index(h: int, w: int, ss: int) -> np.ndarray:
    """[h*ss, w*ss] int64: the flat index of the pixel that each subsample belongs to."""
    out = (np.arange(h * ss)[:, None] // ss) * w + (np.arange(w * ss)[None, :] // ss)
    out.setflags(write=False)
    return out


def render(specs: Sequence[ObjectSpec], background: Background, size: tuple[int, int], supersample: int = 4) -> Scene:
    """Render objects (farthest first) over a background at ``size`` = (H, W) with ``supersample``^2 subsamples per
    pixel, and derive all the ground truth."""
    h, w = size
    s, ss, n = min(h, w), supersample, len(specs)
    xs = (np.arange(w * ss) + 0.5) / ss
    ys = (np.arange(h * ss) + 0.5) / ss
    labels = np.full((h * ss, w * ss), -1, dtype=np.int32)
    amodal = np.zeros((n, h, w), dtype=np.float32)
    for j, sp in enumerate(specs):
        cx, cy, r = sp.center[0] * w, sp.center[1] * h, sp.radius * s
        x0, x1 = max(0, math.floor(cx - r)), min(w, math.ceil(cx + r))
        y0, y1 = max(0, math.floor(cy - r)), min(h, math.ceil(cy + r))
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (xs[x0 * ss:x1 * ss] - cx)[None, :] / r
        dy = (ys[y0 * ss:y1 * ss] - cy)[:, None] / r
        # Screen y points down, so a counter-clockwise on-screen rotation by a is the matrix for -a in (x, y).
        ca, sa = math.cos(sp.angle), math.sin(sp.angle)
        inside = _inside(sp.category, ca * dx - sa * dy, sa * dx + ca * dy)
        labels[y0 * ss:y1 * ss, x0 * ss:x1 * ss][inside] = j
        amodal[j, y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))

    # Subsample counts per (pixel, label) in one bincount; label 0 is the background.
    counts = np.bincount((_pixel_index(h, w, ss) * (n + 1) + labels + 1).ravel(),
                         minlength=h * w * (n + 1)).reshape(h, w, n + 1)
    # The background is smooth, so one value per pixel (at its centre) serves all of the pixel's subsamples.
    px, py = np.arange(w) + 0.5, np.arange(h) + 0.5
    bg = background.evaluate(px[None, :], py[:, None], w, h)
    rgb = np.array([sp.rgb for sp in specs], dtype=np.float64).reshape(n, 3)
    image = ((counts[..., 1:] @ rgb + counts[..., :1] * bg) / (ss * ss)).astype(np.float32)

    instance = np.argmax(counts, axis=-1).astype(np.int32)
    coverage = (counts / (ss * ss)).astype(np.float32).transpose(2, 0, 1).copy()

    lo, hi = BACKGROUND_DEPTH
    depth = np.broadcast_to((lo + (hi - lo) * (1 - py / h))[:, None], (h, w)).astype(np.float64)
    for j, sp in enumerate(specs):
        m = instance == j + 1
        if m.any():
            plane = (sp.depth + sp.slope[0] * (px[None, :] - sp.center[0] * w) / s
                     + sp.slope[1] * (py[:, None] - sp.center[1] * h) / s)
            depth = np.where(m, plane, depth)
    depth = depth.astype(np.float32)

    diff = np.zeros((h, w), dtype=bool)
    horiz = instance[:, 1:] != instance[:, :-1]
    vert = instance[1:, :] != instance[:-1, :]
    diff[:, 1:] |= horiz
    diff[:, :-1] |= horiz
    diff[1:, :] |= vert
    diff[:-1, :] |= vert
    edges = diff & (instance > 0)

    return Scene(size=(h, w), specs=tuple(specs), background=background, image=image, coverage=coverage,
                 amodal=amodal, instance=instance, depth=depth, edges=edges)


def _reflect(p: float, lo: float, hi: float) -> float:
    """Position ``p`` folded into [lo, hi] by bouncing off both ends; ``p`` itself when already inside (exactly)."""
    if lo <= p <= hi:
        return p
    span = hi - lo
    if span <= 0:
        return lo
    q = math.fmod(p - lo, 2 * span)
    if q < 0:
        q += 2 * span
    return lo + (q if q <= span else 2 * span - q)


# ---------------------------------------------------------------------------------------------------------------------
# The world


def _as_size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 8 for v in size)):
        raise ValueError(f"ShapesWorld: 'size' must be an int or a pair (H, W) of ints >= 8, got {size!r}")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class ShapesWorld:
    """A seeded, resolution-free world of scenes; ``scene(i)`` and ``clip(i, frames)`` depend only on (seed, i).

    Args:
        seed: the world seed.
        size: (H, W) of the renders (an int means square). The scene content depends only on its aspect ratio, so
            ``world.resized((2 * H, 2 * W)).scene(i)`` is the same scene (the same specs) at twice the resolution.
        min_objects, max_objects: the object count range (inclusive). Every object of ``scene(i)`` keeps at least
            ``min_visible`` of its in-image area and 4 pixels visible, checked at a fixed layout resolution (short
            side 64, the same aspect; exact at that size, close at others); when no layout with every object visible
            is found in a fixed number of tries, the scene has one object fewer (only very crowded settings hit this).
        categories, colours, sizes: the vocabularies to draw from (subsets allow held-out splits).
        supersample: subsamples per pixel side for antialiasing and coverage.
        min_visible: see above.
        speed: (min, max) object speed in clips, as a fraction of min(H, W) per frame.
    """

    seed: int = 0
    size: tuple[int, int] = (64, 64)
    min_objects: int = 1
    max_objects: int = 4
    categories: tuple[str, ...] = CATEGORIES
    colours: tuple[str, ...] = tuple(PALETTE)
    sizes: tuple[str, ...] = tuple(SIZES)
    supersample: int = 4
    min_visible: float = 0.4
    speed: tuple[float, float] = (0.01, 0.04)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"ShapesWorld: 'seed' must be a non-negative int, got {self.seed!r}")
        object.__setattr__(self, "size", _as_size(self.size))
        if not (1 <= self.min_objects <= self.max_objects <= len(DEPTH_LEVELS)):
            raise ValueError(f"ShapesWorld: need 1 <= min_objects <= max_objects <= {len(DEPTH_LEVELS)}, got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        for name, vocab in (("categories", CATEGORIES), ("colours", tuple(PALETTE)), ("sizes", tuple(SIZES))):
            value = tuple(getattr(self, name))
            if not value or any(v not in vocab for v in value):
                raise ValueError(f"ShapesWorld: '{name}' must be a non-empty subset of {vocab}, got {value!r}")
            object.__setattr__(self, name, value)
        if isinstance(self.supersample, bool) or not isinstance(self.supersample, int) or self.supersample < 1:
            raise ValueError(f"ShapesWorld: 'supersample' must be an int >= 1, got {self.supersample!r}")
        if not (0 <= self.min_visible <= 1):
            raise ValueError(f"ShapesWorld: 'min_visible' must be in [0, 1], got {self.min_visible!r}")
        if not (0 <= self.speed[0] <= self.speed[1]):
            raise ValueError(f"ShapesWorld: 'speed' must be (min, max) with 0 <= min <= max, got {self.speed!r}")

    def resized(self, size) -> "ShapesWorld":
        """The same world rendered at another (H, W)."""
        return dataclasses.replace(self, size=size)

    def render(self, specs: Sequence[ObjectSpec], background: Optional[Background] = None) -> Scene:
        """Render explicit objects (farthest first) at this world's size; for hand-made scenes."""
        return render(list(specs), background or Background(), self.size, self.supersample)

    def _check_index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"ShapesWorld: scene index must be a non-negative int, got {i!r}")
        return int(i)

    def _background(self, rng: np.random.Generator) -> Background:
        grey = rng.uniform(0.22, 0.5)
        c0 = grey + rng.uniform(-0.06, 0.06, 3)
        c1 = c0 + rng.uniform(-0.12, 0.12) + rng.uniform(-0.04, 0.04, 3)
        waves = tuple((float(rng.uniform(0.5, 3.0)), float(rng.uniform(0, math.pi)), float(rng.uniform(0, 2 * math.pi)),
                       float(rng.uniform(0.01, 0.035))) for _ in range(3))
        return Background(tuple(float(v) for v in c0), tuple(float(v) for v in c1), float(rng.uniform(0, 2 * math.pi)),
                          waves)

    def _objects(self, rng: np.random.Generator, n: int) -> list[ObjectSpec]:
        h, w = self.size
        s = min(h, w)
        levels = np.sort(rng.choice(len(DEPTH_LEVELS), size=n, replace=False))[::-1]  # farthest first
        out = []
        for lvl in levels:
            cat = self.categories[rng.integers(len(self.categories))]
            colour = self.colours[rng.integers(len(self.colours))]
            size = self.sizes[rng.integers(len(self.sizes))]
            radius = float(rng.uniform(*SIZES[size]))
            mx, my = _PLACEMENT * radius * s / w, _PLACEMENT * radius * s / h
            center = (float(rng.uniform(mx, 1 - mx)), float(rng.uniform(my, 1 - my)))
            angle = float(rng.uniform(0, 2 * math.pi)) if cat in ROTATING else 0.0
            slope = (float(rng.uniform(-MAX_SLOPE, MAX_SLOPE)), float(rng.uniform(-MAX_SLOPE, MAX_SLOPE)))
            out.append(ObjectSpec(cat, colour, size, radius, center, angle, DEPTH_LEVELS[int(lvl)], slope))
        return out

    def _visible_enough(self, scene: Scene) -> bool:
        for j in range(len(scene.specs)):
            area = int((scene.instance == j + 1).sum())
            if area < 4 or area < self.min_visible * float((scene.amodal[j] > 0.5).sum()):
                return False
        return True

    def scene(self, i: int) -> Scene:
        """Scene ``i`` (any non-negative int)."""
        i = self._check_index(i)
        rng = _rng(self.seed, _SCENE_STREAM, i)
        background = self._background(rng)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        # Layouts are checked at a fixed resolution (short side _LAYOUT_SIDE, same aspect), so the accepted layout,
        # and so the scene, does not depend on the render size.
        h, w = self.size
        layout = (round(_LAYOUT_SIDE * h / min(h, w)), round(_LAYOUT_SIDE * w / min(h, w)))
        while True:
            for _ in range(_MAX_ATTEMPTS):
                specs = self._objects(rng, n)
                check = render(specs, background, layout, self.supersample)
                if n == 1 or self._visible_enough(check):
                    return check if layout == self.size else self.render(specs, background)
            n -= 1

    def clip(self, i: int, frames: int) -> Clip:
        """``frames`` frames of scene ``i`` with its objects moving at constant velocity and bouncing off the borders
        (their centres stay ``0.8 * radius`` inside the image, the placement range of ``scene``)."""
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError(f"ShapesWorld.clip: 'frames' must be an int >= 1, got {frames!r}")
        first = self.scene(i)
        h, w = self.size
        s = min(h, w)
        rng = _rng(self.seed, _MOTION_STREAM, int(i))
        vel = []
        for _ in first.specs:
            speed, theta = rng.uniform(*self.speed) * s, rng.uniform(0, 2 * math.pi)
            vel.append((speed * math.cos(theta), speed * math.sin(theta)))
        vel = np.array(vel, dtype=np.float64).reshape(-1, 2)
        out = [first]
        for f in range(1, int(frames)):
            specs = []
            for sp, (vx, vy) in zip(first.specs, vel):
                mx, my = _PLACEMENT * sp.radius * s, _PLACEMENT * sp.radius * s
                x = _reflect(sp.center[0] * w + vx * f, mx, w - mx) / w
                y = _reflect(sp.center[1] * h + vy * f, my, h - my) / h
                specs.append(dataclasses.replace(sp, center=(x, y)))
            out.append(self.render(specs, first.background))
        return Clip(frames=tuple(out), velocity=vel)
