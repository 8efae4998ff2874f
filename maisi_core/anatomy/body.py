"""The phantom's anatomy: shape primitives on a voxel canvas and the adult body drawn with them.

Everything is given in a *body frame* in mm: ``x`` to the patient's right, ``y`` anterior and
``depth`` downwards from the vertex of the head (an unscaled adult of about 1.75 m). The canvas
holds, per array axis, the body-frame coordinate of every voxel centre, so each shape is evaluated
only inside its bounding box. Per-seed variation comes from :func:`derive_rng` streams named after
each structure, which keeps the draws independent of the grid and of each other.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from maisi_core.anatomy.labels import BODY_ID

# Body outline (depth mm, half-width a, anterior half-depth, posterior half-depth), neck to thighs.
TRUNK_PROFILE = np.array([
    (185, 52, 55, 55), (280, 70, 62, 62), (300, 135, 80, 85), (340, 160, 98, 100), (450, 160, 108, 105),
    (560, 150, 112, 102), (650, 146, 115, 100), (750, 162, 110, 100), (850, 176, 110, 105),
    (935, 172, 100, 100),
], dtype=np.float32)
TRUNK_DEPTH_MM = (185.0, 945.0)
RIBCAGE_PROFILE = np.array([(285, 40), (310, 80), (370, 112), (460, 132), (600, 132)], dtype=np.float32)
HEAD_CENTER_MM = (0.0, 8.0, 105.0)
HEAD_SEMI_MM = (75.0, 92.0, 110.0)
LEG_TOP_MM, LEG_X_MM = 895.0, 88.0
# Centre of the vertebral bodies (y) and their half-sizes along the spine (depth, y, ax, ay).
SPINE_PROFILE = np.array([
    (160, -12, 10, 8), (290, -25, 12, 9), (330, -48, 15, 12), (450, -55, 17, 13), (590, -45, 20, 15),
    (700, -35, 23, 16), (760, -52, 24, 16), (850, -85, 20, 12),
], dtype=np.float32)
CORD_END_MM = 600.0  # the cord ends at about L1
# Rib n: (drop anteriorly in mm, end angle in rad from the posterior midline).
RIB_SHAPE = ((25, 2.3), (40, 2.5), (60, 2.6), (75, 2.65), (85, 2.7), (95, 2.7), (100, 2.65), (100, 2.5),
             (95, 2.35), (85, 2.2), (60, 1.8), (45, 1.4))


def derive_rng(seed: int, name: str) -> np.random.Generator:
    """Return a generator for one named random stream of a seed (stable across runs and platforms)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def vertebra_levels() -> list[tuple[int, float, float]]:
    """Return ``(label, top_depth_mm, bottom_depth_mm)`` for C1 ... L5 and S1, head to feet."""
    levels, top = [], 170.0
    for n in range(7):  # C1 (56) ... C7 (50)
        levels.append((56 - n, top, top + 17.0))
        top += 17.0
    for n in range(12):  # T1 (49) ... T12 (38)
        height = 21.0 + 6.0 * n / 11.0
        levels.append((49 - n, top, top + height))
        top += height
    for n in range(5):  # L1 (37) ... L5 (33)
        levels.append((37 - n, top, top + 32.0))
        top += 32.0
    levels.append((127, top, top + 31.0))  # S1
    return levels


@dataclass(eq=False)
class Canvas:
    """A label map ``(X, Y, Z)`` with the body-frame coordinate (mm) of each index along each axis."""

    shape: tuple[int, int, int]
    x_body: np.ndarray
    y_body: np.ndarray
    depth_body: np.ndarray
    labels: np.ndarray = field(init=False)
    profile: dict[str, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.zeros(self.shape, dtype=np.uint8)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Return the index box holding body-frame points in ``[lo, hi]`` (x, y, depth), or None."""
        out = []
        for coords, a, b in zip((self.x_body, self.y_body, self.depth_body), lo, hi):
            idx = np.nonzero((coords >= a) & (coords <= b))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    def grid(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return broadcastable body-frame coordinates ``(x, y, depth)`` of a box."""
        return (self.x_body[box[0]][:, None, None], self.y_body[box[1]][None, :, None],
                self.depth_body[box[2]][None, None, :])

    def paint(self, box, mask: np.ndarray, label: int, *, over: Sequence[int] | None = None) -> None:
        """Set ``label`` where ``mask`` holds inside the body (and, with ``over``, only on those labels)."""
        sub = self.labels[box]
        m = mask & (sub != 0)
        if over is not None:
            m &= np.isin(sub, over)
        sub[m] = label

    def inside_outline(self, box, *, margin_mm: float, ribcage: bool = False) -> np.ndarray:
        """Return where a box lies inside the trunk outline (or the rib cage) shrunk by ``margin_mm``."""
        x, y, _ = self.grid(box)
        p = {k: v[box[2]][None, None, :] for k, v in self.profile.items()}
        a = (p["ribcage_a"] if ribcage else p["a"]) - margin_mm
        b = np.where(y >= p["yc"], p["b_ant"], p["b_post"]) - margin_mm
        a, b = np.maximum(a, 1e-3), np.maximum(b, 1e-3)
        return (x / a) ** 2 + ((y - p["yc"]) / b) ** 2 <= 1.0


@dataclass(frozen=True)
class Jitter:
    """Per-structure random variation: offset (mm), scale, rotation (deg) and surface ripple."""

    offset: np.ndarray
    scale: np.ndarray
    rot_deg: np.ndarray
    ripple_amp: float
    ripple_k: np.ndarray
    ripple_phase: np.ndarray

    @classmethod
    def draw(cls, seed: int, name: str, *, offset_mm: float = 4.0, scale: float = 0.12,
             rot_deg: float = 6.0, ripple: tuple[float, float] = (0.05, 0.12)) -> Jitter:
        """Draw the variation of structure ``name`` for ``seed``."""
        rng = derive_rng(seed, name)
        return cls(
            offset=rng.normal(0.0, offset_mm, size=3),
            scale=rng.uniform(1 - scale, 1 + scale) * rng.uniform(0.96, 1.04, size=3),
            rot_deg=rng.normal(0.0, rot_deg, size=3),
            ripple_amp=float(rng.uniform(*ripple)),
            ripple_k=rng.normal(0.0, 2.2, size=(3, 3)),
            ripple_phase=rng.uniform(0.0, 2 * np.pi, size=3),
        )


def _rotation(deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def blob(canvas: Canvas, center, semi, jitter: Jitter | None = None, *, rot_deg=(0, 0, 0),
         power: float = 2.0) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """Return ``(box, mask)`` of a rippled superquadric (``power`` 2 is an ellipsoid), or ``(None, None)``."""
    center = np.asarray(center, dtype=np.float64)
    semi = np.asarray(semi, dtype=np.float64)
    rot = np.asarray(rot_deg, dtype=np.float64)
    amp = 0.0
    if jitter is not None:
        center, semi, rot, amp = center + jitter.offset, semi * jitter.scale, rot + jitter.rot_deg, jitter.ripple_amp
    reach = float(semi.max()) * (1.0 + amp) * (3.0 ** 0.5 if power > 2 else 1.0) + 1.0
    box = canvas.box(center - reach, center + reach)
    if box is None:
        return None, None
    x, y, d = canvas.grid(box)
    r = _rotation(rot).astype(np.float32)
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), d - np.float32(center[2])
    local = [(r[0, i] * dx + r[1, i] * dy + r[2, i] * dz) / np.float32(semi[i]) for i in range(3)]
    if power == 2.0:
        f = local[0] ** 2 + local[1] ** 2 + local[2] ** 2
    else:
        f = sum(np.abs(c) ** power for c in local)
    inside = f <= 1.0
    if jitter is not None and amp > 0:  # ripple the surface: only voxels near it can change side
        near = np.abs(f - 1.0) <= 2.0 * amp
        u, v, w = (np.broadcast_to(c, f.shape)[near] for c in local)
        wave = sum(np.sin(jitter.ripple_k[n, 0] * u + jitter.ripple_k[n, 1] * v + jitter.ripple_k[n, 2] * w
                          + jitter.ripple_phase[n]) for n in range(3))
        inside[near] = f[near] - np.float32(2.0 * amp / 3.0) * wave <= 1.0
    return box, inside


def paint_blob(canvas: Canvas, label: int, center, semi, jitter: Jitter | None = None, **kwargs) -> None:
    """Paint a rippled superquadric (see :func:`blob`)."""
    box, mask = blob(canvas, center, semi, jitter, **kwargs)
    if box is not None:
        canvas.paint(box, mask, label)


def paint_tube(canvas: Canvas, label: int, points, radii, *, offset=(0.0, 0.0, 0.0),
               over: Sequence[int] | None = None) -> None:
    """Paint a tube along a polyline of body-frame points with a radius (mm) per point."""
    pts = np.asarray(points, dtype=np.float64) + np.asarray(offset, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        reach = max(r0, r1) + 1.0
        box = canvas.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
        if box is None:
            continue
        x, y, d = canvas.grid(box)
        seg = (p1 - p0).astype(np.float32)
        dx, dy, dz = x - np.float32(p0[0]), y - np.float32(p0[1]), d - np.float32(p0[2])
        t = np.clip((dx * seg[0] + dy * seg[1] + dz * seg[2]) / max(float(seg @ seg), 1e-6), 0.0, 1.0)
        dist2 = (dx - t * seg[0]) ** 2 + (dy - t * seg[1]) ** 2 + (dz - t * seg[2]) ** 2
        canvas.paint(box, dist2 <= (r0 + t * (r1 - r0)) ** 2, label, over=over)


def spine_at(depth: float) -> tuple[float, float, float]:
    """Return the vertebral body's centre ``y`` and half-sizes ``(ax, ay)`` at a depth (mm)."""
    d = SPINE_PROFILE[:, 0]
    return tuple(float(np.interp(depth, d, SPINE_PROFILE[:, i])) for i in (1, 2, 3))  # type: ignore[return-value]


def outline_at(depth: float, *, ribcage: bool = False) -> tuple[float, float, float]:
    """Return the unjittered half-width and anterior/posterior half-depths (mm) at a depth."""
    d = TRUNK_PROFILE[:, 0]
    a = float(np.interp(depth, d, TRUNK_PROFILE[:, 1]))
    if ribcage:
        a = min(a - 14.0, float(np.interp(depth, RIBCAGE_PROFILE[:, 0], RIBCAGE_PROFILE[:, 1])))
    return a, float(np.interp(depth, d, TRUNK_PROFILE[:, 2])), float(np.interp(depth, d, TRUNK_PROFILE[:, 3]))


def draw_anatomy(canvas: Canvas, *, seed: int) -> None:
    """Draw the whole body into a canvas, in painting order (later structures win overlaps)."""
    draw_body(canvas, seed)
    draw_lungs(canvas, seed)
    draw_abdomen(canvas, seed)
    draw_pelvic_organs(canvas, seed)
    draw_mediastinum(canvas, seed)
    draw_head(canvas, seed)
    draw_spine(canvas, seed)
    draw_ribs(canvas, seed)
    draw_pelvic_bones(canvas, seed)


def draw_body(canvas: Canvas, seed: int) -> None:
    """Paint the body envelope (200): head ellipsoid, neck and trunk with elliptic slices, two thighs."""
    rng = derive_rng(seed, "body")
    d = canvas.depth_body.astype(np.float64)
    prof = TRUNK_PROFILE
    wave = lambda amp, lam: 1.0 + amp * np.sin(2 * np.pi * d / lam + rng.uniform(0, 2 * np.pi))  # noqa: E731
    belly = 1.0 + rng.uniform(-0.06, 0.15) * np.exp(-(((d - 700.0) / 110.0) ** 2))
    in_trunk = (d >= TRUNK_DEPTH_MM[0]) & (d <= TRUNK_DEPTH_MM[1])
    a = np.where(in_trunk, np.interp(d, prof[:, 0], prof[:, 1]) * wave(0.04, 420.0), 1e-3)
    canvas.profile = {
        "a": a.astype(np.float32),
        "b_ant": (np.interp(d, prof[:, 0], prof[:, 2]) * wave(0.05, 380.0) * belly).astype(np.float32),
        "b_post": (np.interp(d, prof[:, 0], prof[:, 3]) * wave(0.03, 500.0)).astype(np.float32),
        "yc": np.zeros_like(d, dtype=np.float32),
    }
    canvas.profile["ribcage_a"] = np.minimum(
        canvas.profile["a"] - 14.0, np.interp(d, RIBCAGE_PROFILE[:, 0], RIBCAGE_PROFILE[:, 1])
    ).astype(np.float32)
    full = (slice(None),) * 3
    body = canvas.inside_outline(full, margin_mm=0.0) & in_trunk[None, None, :]
    x, y, dd = canvas.grid(full)
    hc, hs = HEAD_CENTER_MM, HEAD_SEMI_MM
    body |= ((x - hc[0]) / hs[0]) ** 2 + ((y - hc[1]) / hs[1]) ** 2 + ((dd - hc[2]) / hs[2]) ** 2 <= 1.0
    leg_r = np.where(d >= LEG_TOP_MM, 88.0 - 0.06 * np.maximum(d - LEG_TOP_MM, 0.0), 0.0)[None, None, :]
    for side in (-1.0, 1.0):
        body |= (x - side * LEG_X_MM) ** 2 + (y - 5.0) ** 2 <= leg_r ** 2
    canvas.labels[body] = BODY_ID


def draw_lungs(canvas: Canvas, seed: int) -> None:
    """Paint the five lobes: left upper/lower (28/29) at -x, right upper/middle/lower (30/31/32) at +x."""
    for side, name in ((-1.0, "left lung"), (1.0, "right lung")):
        j = Jitter.draw(seed, name, scale=0.08, rot_deg=3.0, ripple=(0.03, 0.08))
        center = (side * 70.0, -8.0, 418.0 if side < 0 else 408.0)
        box, mask = blob(canvas, center, (68.0, 95.0, 150.0), j)
        if box is None:
            continue
        mask &= canvas.inside_outline(box, margin_mm=4.0, ribcage=True)
        x, y, d = canvas.grid(box)
        mask &= side * x >= 12.0
        fis = derive_rng(seed, name + " fissures")
        oblique = 445.0 + fis.normal(0, 8) + (0.9 + fis.normal(0, 0.1)) * (y + 10.0)
        upper = mask & (d < oblique)
        if side < 0:
            canvas.paint(box, upper, 28)
            canvas.paint(box, mask & ~upper, 29)
        else:
            horizontal = 430.0 + fis.normal(0, 8)
            canvas.paint(box, upper & (d < horizontal), 30)
            canvas.paint(box, upper & (d >= horizontal), 31)
            canvas.paint(box, mask & ~upper, 32)


def draw_abdomen(canvas: Canvas, seed: int) -> None:
    """Paint small bowel, colon, stomach, liver, gallbladder, spleen, pancreas, kidneys, IVC."""
    j = lambda name, **kw: Jitter.draw(seed, name, **kw)  # noqa: E731
    paint_blob(canvas, 19, (0.0, 35.0, 705.0), (72.0, 45.0, 62.0), j("small bowel"))
    # ascending colon (patient right, +x), transverse, descending (left, -x), sigmoid, rectum
    colon = [(75, 15, 770), (85, 10, 690), (78, 18, 640), (30, 60, 665), (-20, 62, 670), (-80, 12, 605),
             (-92, 0, 650), (-90, 2, 730), (-80, 10, 790), (-40, 30, 825), (0, 10, 850), (0, -55, 885), (0, -62, 935)]
    jc = j("colon", offset_mm=5.0)
    radii = 19.0 * jc.scale[0] + 3.0 * np.sin(np.arange(len(colon)) * 1.7 + jc.ripple_phase[0])
    paint_tube(canvas, 62, colon, radii, offset=jc.offset)
    paint_blob(canvas, 12, (-48.0, 22.0, 565.0), (42.0, 36.0, 70.0), j("stomach"), rot_deg=(0, 25, 0))
    jl = j("liver", scale=0.1)
    paint_blob(canvas, 1, (62.0, -2.0, 572.0), (80.0, 88.0, 80.0), jl, power=2.4)
    jl2 = Jitter(jl.offset, jl.scale, jl.rot_deg, jl.ripple_amp, jl.ripple_k[::-1], jl.ripple_phase)
    paint_blob(canvas, 1, (-8.0, 40.0, 545.0), (60.0, 35.0, 38.0), jl2, rot_deg=(0, 0, -10))
    paint_blob(canvas, 10, (48.0, 42.0, 615.0), (14.0, 14.0, 30.0), j("gallbladder"), rot_deg=(20, -10, 0))
    paint_blob(canvas, 3, (-92.0, -48.0, 565.0), (24.0, 52.0, 55.0), j("spleen"), rot_deg=(0, 0, 35))
    jp = j("pancreas", offset_mm=3.0)
    pancreas = [(22, 12, 635), (-5, 15, 620), (-45, 0, 605), (-80, -25, 590)]  # head (right) to tail (left)
    paint_tube(canvas, 4, pancreas, np.array([17.0, 13.0, 11.0, 10.0]) * jp.scale[0], offset=jp.offset)
    for side, label in ((1.0, 5), (-1.0, 14)):  # the right kidney (5) sits lower, under the liver
        depth = 650.0 if side > 0 else 632.0
        paint_blob(canvas, label, (side * 72.0, -40.0, depth), (28.0, 25.0, 55.0),
                   j("right kidney" if side > 0 else "left kidney"), rot_deg=(0, side * -12.0, side * 20.0))
    ji = j("inferior vena cava", offset_mm=2.0)
    ivc = [(22, spine_at(dd)[0] + spine_at(dd)[2] + 14, dd) for dd in (470.0, 560.0, 650.0, 720.0)]
    paint_tube(canvas, 7, ivc, 11.0 * ji.scale[0], offset=ji.offset)


def draw_pelvic_organs(canvas: Canvas, seed: int) -> None:
    """Paint the bladder (15)."""
    paint_blob(canvas, 15, (0.0, 55.0, 875.0), (40.0, 34.0, 30.0), Jitter.draw(seed, "bladder", scale=0.2))


def draw_mediastinum(canvas: Canvas, seed: int) -> None:
    """Paint heart (115), aorta (6), esophagus (11), trachea (57) and main bronchi (airway 132)."""
    paint_blob(canvas, 115, (-22.0, 28.0, 445.0), (58.0, 46.0, 58.0), Jitter.draw(seed, "heart"),
               rot_deg=(-15, -10, -25))
    ja = Jitter.draw(seed, "aorta", offset_mm=3.0)
    aorta = [(-5.0, 20.0, 430.0), (-3.0, 22.0, 385.0), (-4.0, 8.0, 348.0), (-12.0, -18.0, 352.0)]  # arch to the left
    for dd in (390.0, 460.0, 540.0, 620.0, 700.0):
        yv, _, ay = spine_at(dd)
        aorta.append((-18.0 + 13.0 * (dd - 390.0) / 310.0, yv + ay + 13.0, dd))
    paint_tube(canvas, 6, aorta, np.linspace(14.0, 10.0, len(aorta)) * ja.scale[0], offset=ja.offset)
    je = Jitter.draw(seed, "esophagus", offset_mm=2.0)
    eso = [(0.0, spine_at(dd)[0] + spine_at(dd)[2] + 9.0, dd) for dd in (200.0, 300.0, 400.0, 480.0)]
    paint_tube(canvas, 11, eso + [(-30.0, 12.0, 530.0)], 7.0, offset=je.offset)
    jt = Jitter.draw(seed, "trachea", offset_mm=2.0)
    carina = (0.0, spine_at(385.0)[0] + spine_at(385.0)[2] + 30.0, 385.0)
    paint_tube(canvas, 57, [(0.0, 35.0, 195.0), (0.0, 12.0, 290.0), carina], 9.0 * jt.scale[0], offset=jt.offset)
    for side in (-1.0, 1.0):
        end = (side * 42.0, carina[1] - 4.0, carina[2] + 38.0)
        paint_tube(canvas, 132, [carina, end], 6.0, offset=jt.offset)


def draw_head(canvas: Canvas, seed: int) -> None:
    """Paint brain (22) and skull (120): a bony shell around the brain with a floor under it."""
    j = Jitter.draw(seed, "brain", scale=0.06, ripple=(0.02, 0.05))
    center, semi = (0.0, 10.0, 92.0), np.array([64.0, 80.0, 72.0])
    paint_blob(canvas, 120, center, semi + 8.0, j)
    paint_blob(canvas, 22, center, semi, j)


def draw_spine(canvas: Canvas, seed: int) -> None:
    """Paint vertebrae C1-L5 (56-33) and S1 (127) with body, arch and processes, sacrum (97), cord (121)."""
    rng = derive_rng(seed, "spine")
    shift = rng.normal(0.0, 3.0, size=2)
    for label, top, bottom in vertebra_levels():
        mid = 0.5 * (top + bottom)
        yv, ax, ay = spine_at(mid)
        yv += shift[1]
        canal_r = 7.0 if label != 127 else 6.0
        yc = yv - ay - canal_r - 1.0
        box = canvas.box((shift[0] - ax - 16, yc - canal_r - 30, top), (shift[0] + ax + 16, yv + ay + 1, bottom))
        if box is None:
            continue
        x, y, d = canvas.grid(box)
        x = x - np.float32(shift[0])
        ring = x ** 2 + (y - yc) ** 2
        bone = ((x / ax) ** 2 + ((y - yv) / ay) ** 2 <= 1.0) & (d >= top + 2.0) & (d <= bottom - 2.0)
        bone |= (ring <= (canal_r + 5.0) ** 2) & (ring > canal_r ** 2) & (d >= top + 1.0) & (d <= bottom - 1.0)
        bone |= (np.abs(x) <= 4.0) & (y <= yc - canal_r) & (y >= yc - canal_r - 28.0) & (d >= top + 3.0)
        bone |= (np.abs(y - yc) <= 5.0) & (np.abs(x) <= ax + 14.0) & (np.abs(d - mid) <= 6.0)
        canvas.paint(box, bone, label)
        if top < CORD_END_MM:
            canvas.paint(box, (ring <= 4.5 ** 2) & (d <= CORD_END_MM), 121)
    s1_bottom = vertebra_levels()[-1][2]
    for dd in np.arange(s1_bottom, 850.0, 4.0):
        yv, _, ay = spine_at(dd)
        half = 46.0 - 0.3 * (dd - s1_bottom)
        paint_blob(canvas, 97, (shift[0], yv + shift[1], dd + 2.0), (half, 16.0, 3.0), None, power=4.0)


def draw_ribs(canvas: Canvas, seed: int) -> None:
    """Paint twelve rib pairs (left 63-74 at -x, right 75-86 at +x) and the sternum (122)."""
    rng = derive_rng(seed, "ribs")
    levels = [lv for lv in vertebra_levels() if 38 <= lv[0] <= 49]  # T1 ... T12
    for n, (_, top, bottom) in enumerate(levels):
        drop, phi_end = RIB_SHAPE[n]
        drop *= rng.uniform(0.9, 1.1)
        mid = 0.5 * (top + bottom)
        yv, ax, _ = spine_at(mid)
        for side, first in ((-1.0, 63), (1.0, 75)):
            pts = [(side * (ax + 8.0), yv, mid)]
            for phi in np.linspace(0.45, phi_end, 9):
                dd = mid + drop * ((phi - 0.45) / (phi_end - 0.45)) ** 1.3
                a, b_ant, b_post = outline_at(dd, ribcage=True)
                b = (b_ant if np.cos(phi) < 0 else b_post) - 14.0
                pts.append((side * a * np.sin(phi), -b * np.cos(phi), dd))
            paint_tube(canvas, first + n, pts, 5.0)
    for dd in np.arange(330.0, 520.0, 5.0):
        _, b_ant, _ = outline_at(dd)
        paint_blob(canvas, 122, (0.0, b_ant - 22.0, dd), (13.0, 6.0, 3.0), None, power=4.0)


def draw_pelvic_bones(canvas: Canvas, seed: int) -> None:
    """Paint the hips (left 95 at -x, right 96 at +x) and femurs (left 93, right 94)."""
    for side, hip, femur in ((-1.0, 95, 93), (1.0, 96, 94)):
        name = "left" if side < 0 else "right"
        jh = Jitter.draw(seed, name + " hip", scale=0.06, rot_deg=4.0, ripple=(0.03, 0.07))
        paint_blob(canvas, hip, (side * 88.0, -30.0, 775.0), (14.0, 62.0, 58.0), jh, rot_deg=(0, side * 15, side * 40))
        acetabulum = np.array([side * 90.0, 8.0, 865.0]) + jh.offset
        paint_blob(canvas, hip, acetabulum, (32.0, 32.0, 30.0), None)
        paint_tube(canvas, hip, [acetabulum, (side * 10.0, 68.0, 880.0)], 10.0, offset=(0, 0, 0))
        paint_tube(canvas, hip, [acetabulum, (side * 58.0, -28.0, 920.0)], 11.0)
        paint_tube(canvas, hip, [(side * 88.0, -45.0, 740.0), (side * 40.0, -70.0, 785.0)], 12.0, offset=jh.offset)
        jf = Jitter.draw(seed, name + " femur", offset_mm=2.0, scale=0.05)
        head = acetabulum + jf.offset * 0.3
        paint_blob(canvas, femur, head, (23.0, 23.0, 23.0), None)
        neck = head + np.array([side * 34.0, -10.0, 24.0])
        paint_tube(canvas, femur, [head, neck], 14.0)
        shaft_end = np.array([side * 100.0, 8.0, 1350.0]) + jf.offset
        paint_tube(canvas, femur, [neck, neck + np.array([0.0, 0.0, 12.0]), shaft_end], 15.0 * jf.scale[0])
