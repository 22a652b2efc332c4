"""Procedural 3-D scenes rendered by exact, vectorised ray casting (numpy only).

A room (textured floor plane ``y = 0`` and back wall ``z = WALL_Z``) seen by a pinhole camera with
jittered height, pitch, yaw, roll and a narrow field of view (32-40 deg), so that the objects cover about
26 % of the pixels (ImageNet's photos are object-centric; at 50-62 deg they covered 12 %, and the class was
well under 1 % of a pretrained encoder's feature variance; docs/findings.md, 2026-12-02). Each scene
holds 3..10 objects, ALL of one shape class; colour, texture (solid/stripes/checker), size, rotation and
material are drawn independently of the class, so the label is the shape and never the colour.

Shapes are convex polyhedra (clipped ray/half-space intersection), spheres, or unions of these:

    0 sphere, 1 cube, 2 cylinder (16-gon prism), 3 cone (16-gon pyramid), 4 pyramid (square),
    5 capsule (lying; prism + two spheres), 6 star prism (six-pointed: three thin boxes 60 deg apart),
    7 octahedron (diamond standing on a vertex).

Each pixel casts one primary ray; the nearest hit wins (z-buffer), so occlusion is exact. Shading is
Lambert + Blinn-Phong specular with hard shadows (a shadow ray per pixel to one point light, a lamp
just above and behind the camera).

Determinism: everything comes from ``np.random.default_rng([seed, index])``; output is byte-identical
per (seed, index), on every machine. DVC tracks the export by hash, so no BLAS call (``@``, ``dot``,
``einsum``, ``linalg.norm``) is made: their kernels (chosen by CPU, ``OPENBLAS_CORETYPE``, thread count)
round differently in the last bits (seen in the objects' ``pixel_coords``; an edge pixel or a hit test
could move too). Dot products and 3x3 products are written out component by component (`_dot`, `_mul`):
a fixed order of elementwise operations. Sines, cosines, tangents and powers come from the C library
(`math`; arrays element by element through `_sin`, `_cos`, `_pow`), not from numpy's ufuncs, which
may run other kernels on CPUs with AVX-512 (SVML) whose last bits differ. The class of scene ``index``
is ``index % 8`` (exactly balanced over any 8 consecutive indices). Every object is visible (at least ``min_visible_pixels`` pixels in the
object-id buffer); otherwise the layout is redrawn keeping class and count.

`Layout` holds the object draws (how many, how large, how far); `ROOM` is the embedded default's, which
every stage renders. Other layouts serve generator experiments (`benchmarks/scenes.py` and
`benchmarks/demo_quality.py`, flags `--objects`, `--object-size`, `--object-depth`), e.g. object-centric
photos of one or two large objects, `Layout(count=(1, 2), size=(0.5, 0.8), depth=(3.2, 5.0))`
(docs/findings.md, twelfth session).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("sphere", "cube", "cylinder", "cone", "pyramid", "capsule", "star_prism", "octahedron")
NUM_CLASSES = len(SHAPES)
COLORS = {
    "red": (0.80, 0.15, 0.12), "green": (0.15, 0.65, 0.20), "blue": (0.15, 0.30, 0.85),
    "yellow": (0.90, 0.80, 0.15), "cyan": (0.15, 0.75, 0.80), "purple": (0.55, 0.20, 0.75),
    "gray": (0.55, 0.55, 0.55), "brown": (0.50, 0.30, 0.12),
}
MATERIALS = ("rubber", "metal")
TEXTURES = ("solid", "stripes", "checker")
WALL_Z = 11.0
MAX_DEPTH = 10.0
_EPS = 1e-4
# Per-shape scale so that every class covers about the same mean image area (measured over 4 x 2,400 scenes);
# otherwise the share of object pixels in a colour histogram would leak the class.
_AREA_SCALE = {"sphere": 1.054, "cube": 0.848, "cylinder": 0.957, "cone": 1.092, "pyramid": 0.975,
               "capsule": 1.11, "star_prism": 0.954, "octahedron": 1.266}


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (..., 3) arrays (broadcast), summed in a fixed order: (...)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _norm(a: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean norm of (..., 3): (...)."""
    return np.sqrt(_dot(a, a))


_SIN, _COS = np.frompyfunc(math.sin, 1, 1), np.frompyfunc(math.cos, 1, 1)
_POW = np.frompyfunc(math.pow, 2, 1)


def _sin(x) -> np.ndarray:
    """sin of every element, from the C library: the same bits on every x86 CPU (numpy's may not be)."""
    return np.asarray(_SIN(x), dtype=float)


def _cos(x) -> np.ndarray:
    """cos of every element, from the C library (see `_sin`)."""
    return np.asarray(_COS(x), dtype=float)


def _pow(x, y) -> np.ndarray:
    """x ** y elementwise (broadcast), from the C library (see `_sin`)."""
    return np.asarray(_POW(x, y), dtype=float)


def _mul(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x @ m without BLAS: x (n, 3) or (3,), m (3, k) -> (n, k) or (k,), summed over the 3 in a fixed order."""
    x = np.asarray(x, float)
    return x[..., 0, None] * m[0] + x[..., 1, None] * m[1] + x[..., 2, None] * m[2]


@dataclass(frozen=True)
class Layout:
    """The object draws of a scene, each uniform in [min, max]: `count` objects (integers), each of radius
    `size` (metres, before the per-shape area factor), standing `depth` metres ahead of the camera."""

    count: tuple[int, int] = (3, 10)
    size: tuple[float, float] = (0.3, 0.5)
    depth: tuple[float, float] = (2.8, 7.5)

    def __post_init__(self):
        for name, (lo, hi), low in (("count", self.count, 1), ("size", self.size, 0.05), ("depth", self.depth, 1.0)):
            if not low <= lo <= hi:
                raise ValueError(f"Layout.{name} = {[lo, hi]} is not allowed; "
                                 f"expected [min, max] with {low} <= min <= max")


ROOM = Layout()  # the embedded default: 3..10 objects, what the CLEVR count labels need


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, camera-z distance in metres, clipped to MAX_DEPTH
    label: int  # shape class 0..7
    objects: list[dict] = field(default_factory=list)
    count: int = 0
    closest: float = 0.0  # min over objects of their centre's camera depth
    object_pixels: int = 0  # pixels that show an object (the object-id buffer): not exported


# ---------------------------------------------------------------- primitives (local frame, y up)
def _prism_planes(n: int, r: float, y0: float, y1: float):
    th = 2 * np.pi * np.arange(n) / n
    nrm = np.stack([_cos(th), np.zeros(n), _sin(th)], 1)
    d = np.full(n, r)
    nrm = np.concatenate([nrm, [[0, 1, 0], [0, -1, 0]]])
    d = np.concatenate([d, [y1, -y0]])
    return nrm, d


def _pyramid_planes(n: int, a: float, h: float):
    th = 2 * np.pi * np.arange(n) / n
    nrm = np.stack([h * _cos(th), np.full(n, a), h * _sin(th)], 1)
    ln = _norm(nrm)
    nrm = nrm / ln[:, None]
    d = a * h / ln
    return np.concatenate([nrm, [[0, -1, 0]]]), np.concatenate([d, [0.0]])


def _make_parts(shape: str, s: float):
    """List of parts: ('planes', normals, d) or ('sphere', centre, radius); bounding radius & centre."""
    if shape == "sphere":
        return [("sphere", np.array([0, s, 0.0]), s)], np.array([0, s, 0.0]), s
    if shape == "cube":
        a = 0.85 * s
        n, d = _prism_planes(4, a, 0, 2 * a)
        return [("planes", n, d)], np.array([0, a, 0.0]), a * 1.8
    if shape == "cylinder":
        n, d = _prism_planes(16, 0.8 * s, 0, 2.0 * s)
        return [("planes", n, d)], np.array([0, s, 0.0]), 1.3 * s
    if shape == "cone":
        n, d = _pyramid_planes(16, 1.0 * s, 2.4 * s)
        return [("planes", n, d)], np.array([0, 1.2 * s, 0.0]), 1.6 * s
    if shape == "pyramid":
        n, d = _pyramid_planes(4, 1.0 * s, 2.2 * s)
        return [("planes", n, d)], np.array([0, 1.1 * s, 0.0]), 1.8 * s
    if shape == "capsule":
        r, hl = 0.6 * s, 0.9 * s
        th = 2 * np.pi * np.arange(16) / 16
        nrm = np.stack([np.zeros(16), _cos(th), _sin(th)], 1)
        d = r + nrm[:, 1] * r  # axis along x at height r
        nrm = np.concatenate([nrm, [[1, 0, 0], [-1, 0, 0]]])
        d = np.concatenate([d, [hl, hl]])
        parts = [("planes", nrm, d), ("sphere", np.array([hl, r, 0]), r), ("sphere", np.array([-hl, r, 0]), r)]
        return parts, np.array([0, r, 0.0]), hl + r
    if shape == "star_prism":  # six-pointed asterisk prism: three thin boxes 60 deg apart
        h, ln, w = 1.1 * s, 1.15 * s, 0.28 * s
        parts = []
        for k in range(3):
            th = k * np.pi / 3
            ax, pe = np.array([math.cos(th), 0, math.sin(th)]), np.array([-math.sin(th), 0, math.cos(th)])
            nrm = np.stack([ax, -ax, pe, -pe, [0, 1, 0], [0, -1, 0]])
            parts.append(("planes", nrm, np.array([ln, ln, w, w, h, 0.0])))
        return parts, np.array([0, h / 2, 0.0]), 1.3 * s
    if shape == "octahedron":
        c = 1.1 * s
        sg = np.array([[x, y, z] for x in (1, -1) for y in (1, -1) for z in (1, -1)], float) / np.sqrt(3)
        d = c / np.sqrt(3) + sg[:, 1] * c
        return [("planes", sg, d)], np.array([0, c, 0.0]), 1.2 * c
    raise ValueError(shape)


def _hit_planes(o, v, nrm, d):
    den = _mul(v, nrm.T)
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    t = (d - _mul(o, nrm.T)) / den
    t_in = np.where(den < 0, t, -np.inf)
    k = np.argmax(t_in, axis=1)
    t_enter = np.take_along_axis(t_in, k[:, None], 1)[:, 0]
    t_exit = np.where(den > 0, t, np.inf).min(axis=1)
    ok = (t_enter < t_exit) & (t_enter > _EPS)
    return np.where(ok, t_enter, np.inf), nrm[k]


def _hit_sphere(o, v, c, r):
    oc = o - c
    b = _dot(oc, v)
    cc = _dot(oc, oc) - r * r
    disc = b * b - cc
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc > 0) & (t > _EPS), t, np.inf)
    p = oc + t[:, None] * v
    return t, np.nan_to_num(p / r, posinf=0.0, neginf=0.0, nan=0.0)


class _Obj:
    def __init__(self, shape, size, pos, yaw):
        self.parts, bc, self.brad = _make_parts(shape, size)
        c, s = math.cos(yaw), math.sin(yaw)
        self.R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # local -> world
        self.pos = np.asarray(pos, float)
        self.bcen = self.pos + _mul(bc, self.R.T)

    def to_local(self, p):
        return _mul(p - self.pos, self.R)

    def hit(self, o, v, need_normal=True):
        """Return (idx, t, normal) for the rays in ``idx`` that meet the bounding sphere."""
        oc = o - self.bcen
        b = _dot(oc, v)
        disc = b * b - (_dot(oc, oc) - self.brad**2)
        idx = np.nonzero(disc > 0)[0]
        if len(idx) == 0:
            return idx, np.zeros(0), np.zeros((0, 3))
        lo = _mul(o[idx] - self.pos, self.R)
        lv = _mul(v[idx], self.R)
        tb = nb = None
        for part in self.parts:
            if part[0] == "planes":
                tp, npart = _hit_planes(lo, lv, part[1], part[2])
            else:
                tp, npart = _hit_sphere(lo, lv, part[1], part[2])
            if tb is None:
                tb, nb = tp, npart
            else:
                better = tp < tb
                tb = np.where(better, tp, tb)
                if need_normal:
                    nb = np.where(better[:, None], npart, nb)
        return idx, tb, (_mul(nb, self.R.T) if need_normal else None)


# ---------------------------------------------------------------- scene
def _texture(kind, lp, scale, rng_phase):
    if kind == "solid":
        return np.ones(len(lp))
    if kind == "stripes":
        return np.where(_sin(lp[:, 1] / scale * 9.0 + rng_phase) > 0, 1.0, 0.55)
    q = np.floor(lp / (scale * 0.45) + rng_phase).astype(int).sum(1)
    return np.where(q % 2 == 0, 1.0, 0.55)


def _camera(rng):
    h = rng.uniform(1.6, 2.6)
    pitch = np.deg2rad(rng.uniform(14, 24))
    yaw = np.deg2rad(rng.uniform(-8, 8))
    roll = np.deg2rad(rng.uniform(-5, 5))
    fov = np.deg2rad(rng.uniform(32.5, 40.3))  # a tele lens: objects ~26 % of the pixels, not ~12 %
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    fwd = np.array([sy * cp, -sp, cy * cp])
    right0 = np.array([cy, 0, -sy])
    up0 = np.cross(fwd, right0)
    right = cr * right0 + sr * up0
    up = -sr * right0 + cr * up0
    f = 0.5 / math.tan(fov / 2)
    return np.array([0.0, h, 0.0]), fwd, right, up, f


def _project(p, cam, image_size):
    o, fwd, right, up, f = cam
    q = p - o
    z = _dot(q, fwd)
    u = _dot(q, right) * f / z
    w = _dot(q, up) * f / z
    return (u + 0.5) * image_size, (0.5 - w) * image_size, z


def _render(layout, cam, image_size, light, room):
    o, fwd, right, up, f = cam
    n = image_size
    js = (np.arange(n) + 0.5) / n - 0.5
    U, W = np.meshgrid(js, -js)
    v = fwd[None] * f + U.reshape(-1, 1) * right[None] + W.reshape(-1, 1) * up[None]
    v /= _norm(v)[:, None]
    orig = np.broadcast_to(o, v.shape)
    npx = len(v)
    # room: floor y=0 and wall z=WALL_Z
    t_floor = np.where(v[:, 1] < -1e-9, -o[1] / np.minimum(v[:, 1], -1e-9), np.inf)
    t_wall = np.where(v[:, 2] > 1e-9, (WALL_Z - o[2]) / np.maximum(v[:, 2], 1e-9), np.inf)
    ids = np.where(t_floor < t_wall, -1, -2)
    t = np.minimum(t_floor, t_wall)
    nrm = np.where((ids == -1)[:, None], np.array([0.0, 1, 0]), np.array([0.0, 0, -1]))
    for i, ob in enumerate(layout):
        idx, ti, ni = ob["_obj"].hit(orig, v)
        b = ti < t[idx]
        sel = idx[b]
        t[sel] = ti[b]
        ids[sel] = i
        nrm[sel] = ni[b]
    P = orig + t[:, None] * v
    # base colour
    base = np.empty((npx, 3))
    fl = ids == -1
    chk = (np.floor(P[fl, 0] / room["tile"]) + np.floor(P[fl, 2] / room["tile"])) % 2
    base[fl] = np.where(chk[:, None] == 0, room["floor"][0], room["floor"][1])
    wl = ids == -2
    stp = _sin(P[wl, 0] * room["wall_freq"]) > 0.6
    base[wl] = np.where(stp[:, None], room["wall"][1], room["wall"][0])
    spec_k = np.zeros(npx)
    shin = np.full(npx, 8.0)
    for i, ob in enumerate(layout):
        m = ids == i
        if not m.any():
            continue
        lp = ob["_obj"].to_local(P[m])
        tex = _texture(ob["texture"], lp, ob["size"], ob["_phase"])
        base[m] = np.asarray(COLORS[ob["color"]])[None] * (tex * ob["_albedo"])[:, None]
        metal = ob["material"] == "metal"
        spec_k[m] = 0.9 if metal else 0.15
        shin[m] = 60.0 if metal else 10.0
    # lighting with shadow rays
    L = light - P
    dist = _norm(L)
    L /= dist[:, None]
    ndl = _dot(nrm, L)
    so = P + nrm * 1e-3
    lit = ndl > 0
    idx = np.nonzero(lit)[0]
    shadow = np.zeros(npx, bool)
    if len(idx):
        so_l, l_l, d_l = so[idx], L[idx], dist[idx]
        sh = np.zeros(len(idx), bool)
        for ob in layout:
            j, ts, _ = ob["_obj"].hit(so_l, l_l, need_normal=False)
            sh[j[ts < d_l[j]]] = True
        shadow[idx] = sh
    vis = (~shadow) & lit
    H = L - v
    H /= _norm(H)[:, None] + 1e-12
    ndh = np.clip(_dot(nrm, H), 0, 1)
    diff = np.where(vis, ndl, 0.0)
    spec = np.where(vis, spec_k * _pow(ndh, shin), 0.0)
    col = base * (room["ambient"] + room["diffuse"] * diff[:, None]) + spec[:, None]
    img = (_pow(np.clip(col, 0, 1), 1 / 2.2) * 255 + 0.5).astype(np.uint8).reshape(n, n, 3)
    depth = np.clip(t * _dot(v, fwd), 0, MAX_DEPTH).astype(np.float32).reshape(n, n)
    counts = np.bincount(ids[ids >= 0], minlength=len(layout))
    return img, depth, counts


def _color_pair(rng, lo, hi):
    a = rng.uniform(lo, hi, 3)
    return np.stack([a, a * rng.uniform(0.6, 0.85)])


def _draw_layout(rng, shape, count, cam, layout: Layout) -> list[dict]:
    """Up to `count` objects of `shape` at `layout`'s sizes and depths, kept apart on the floor (fewer if
    500 draws could not place them: the caller redraws the camera)."""
    o, fwd, right, up, f = cam
    placed = []
    tries = 0
    while len(placed) < count and tries < 500:
        tries += 1
        size = rng.uniform(*layout.size) * _AREA_SCALE[shape]  # class-independent draw, area-equalised
        z = rng.uniform(*layout.depth)
        half = (z * 0.5 / f) * 0.85 * (1.0 if z > 4 else 0.8)
        x = rng.uniform(-half, half) + o[0] + fwd[0] * z
        # keep apart in xz
        if any(np.hypot(x - q["3d_coords"][0], z - q["3d_coords"][2]) < 1.15 * (size + q["size"]) * 1.1
               for q in placed):
            continue
        yaw = rng.uniform(0, 2 * np.pi)
        placed.append({
            "shape": shape, "color": str(rng.choice(list(COLORS))), "material": str(rng.choice(MATERIALS)),
            "texture": str(rng.choice(TEXTURES)), "size": float(size),
            "3d_coords": [float(x), 0.0, float(z)], "rotation": float(np.rad2deg(yaw)),
            "_phase": float(rng.uniform(0, 1)), "_albedo": float(rng.uniform(0.6, 1.2)),
        })
    return placed


def render_scene(seed: int, index: int, image_size: int = 64, min_visible_pixels: int | None = None,
                 layout: Layout = ROOM) -> Scene:
    """Render scene ``index`` of dataset ``seed``; byte-identical for the same arguments."""
    rng = np.random.default_rng([seed, index])
    label = int(index % NUM_CLASSES)
    shape = SHAPES[label]
    count = int(rng.integers(layout.count[0], layout.count[1] + 1))
    if min_visible_pixels is None:
        min_visible_pixels = max(4, int(round(6 * (image_size / 64) ** 2)))
    for _attempt in range(200):
        cam = _camera(rng)
        # A lamp just above and behind the camera: shadows fall mostly behind the objects. With an overhead
        # light the share of shadowed (dark) pixels depends on the shape (an octahedron on its vertex shades
        # its lower half and casts a wide shadow, a cone hardly any), which a colour histogram reads.
        light = cam[0] + np.array([rng.uniform(-1, 1), rng.uniform(0.425, 1.175), rng.uniform(-1, 0)])
        room = {
            "tile": rng.uniform(0.5, 1.2), "floor": _color_pair(rng, 0.45, 0.8),
            "wall": _color_pair(rng, 0.4, 0.75), "wall_freq": rng.uniform(1.5, 4.0),
            "ambient": rng.uniform(0.2, 0.4), "diffuse": rng.uniform(0.6, 0.95),
        }
        placed = _draw_layout(rng, shape, count, cam, layout)
        if len(placed) < count:
            continue
        for ob in placed:
            ob["_obj"] = _Obj(shape, ob["size"], ob["3d_coords"], np.deg2rad(ob["rotation"]))
        img, depth, counts = _render(placed, cam, image_size, light, room)
        if counts.min() >= min_visible_pixels:
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError(f"could not place {count} visible objects for seed={seed} index={index}")
    objects = []
    for ob in placed:
        c = ob["_obj"].bcen
        u, w, z = _project(c, cam, image_size)
        objects.append({
            "shape": ob["shape"], "color": ob["color"], "material": ob["material"], "texture": ob["texture"],
            "size": ob["size"], "3d_coords": ob["3d_coords"], "rotation": ob["rotation"],
            "pixel_coords": [float(u), float(w), float(z)],
        })
    closest = float(min(o["pixel_coords"][2] for o in objects))
    return Scene(image=img, depth=depth, label=label, objects=objects, count=count, closest=closest,
                 object_pixels=int(counts.sum()))


def _render_args(args):
    return render_scene(*args)


def render_many(seed: int, indices: Sequence[int], image_size: int = 64, processes: int = 2,
                layout: Layout = ROOM) -> list[Scene]:
    """Render many scenes in ``processes`` worker processes; results are in the order of ``indices``."""
    args = [(seed, int(i), image_size, None, layout) for i in indices]
    if processes <= 1 or len(args) < 2:
        return [render_scene(*a) for a in args]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(processes) as pool:
        return pool.map(_render_args, args, chunksize=max(1, len(args) // (4 * processes)))
