"""Synthetic street scenes written in the Cityscapes layout: the built-in dataset, deterministic from a seed."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.errors import ConfigError, DataError
from pipeline.io import progress_interval

log = logging.getLogger("pipeline.data")

VERSION = 1  # bump whenever the scenes change, so ensure_synthetic regenerates old folders
SPLITS = ("train", "val")
CITIES = {"train": ("eastvale", "northport", "riverton"), "val": ("lakeside", "westbury")}  # sorted: file order = index

# Cityscapes labelIds. Ego vehicle, static clutter, ground and rail track are ignored in evaluation, as in the
# real data, so the model meets void regions too.
EGO, STATIC, GROUND, RAIL = 1, 4, 6, 10
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, RIDER = 21, 22, 23, 24, 25
CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = 26, 27, 28, 31, 32, 33

# Pixel noise per labelId (grey levels): foliage and grass are busy, sky and paint smooth.
TEXTURE = np.full(256, 5.0, np.float32)
TEXTURE[[VEGETATION, TERRAIN, ROAD, SIDEWALK, GROUND, SKY]] = (24.0, 14.0, 8.0, 8.0, 8.0, 1.5)

FACADES = ((190, 170, 150), (160, 150, 140), (205, 195, 175), (140, 110, 90), (175, 160, 165), (120, 115, 110),
           (150, 90, 70), (215, 210, 200))
PAINT = ((205, 205, 210), (30, 30, 35), (150, 20, 25), (20, 40, 110), (120, 125, 130), (235, 235, 230),
         (60, 90, 60), (185, 150, 40))
SKIN = ((230, 190, 160), (200, 150, 110), (140, 95, 65), (90, 60, 40))
LAMPS = ((255, 40, 30), (255, 180, 0), (40, 255, 120))
# (width, length, body bottom, body top, roof) ranges in metres; roof None: a box (truck, bus, tram)
VEHICLES = {CAR: ((1.6, 1.9), (3.8, 4.8), (0.3, 0.3), (0.85, 1.0), (1.35, 1.55)),
            TRUCK: ((2.3, 2.5), (7.0, 10.0), (0.5, 0.6), (3.0, 3.8), None),
            BUS: ((2.5, 2.55), (11.0, 13.0), (0.35, 0.35), (3.0, 3.3), None),
            TRAIN: ((2.4, 2.65), (20.0, 30.0), (0.4, 0.45), (3.3, 3.5), None)}


class Scene:
    """One image being painted (RGB, labelIds, a shading map) by a pinhole camera above a flat street.

    World coordinates in metres: X across (right positive), Z up, d depth along the road.
    """

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]) -> None:
        self.rng, (self.H, self.W) = rng, size
        self.img = np.zeros((self.H, self.W, 3), np.uint8)
        self.lab = np.zeros((self.H, self.W), np.uint8)
        self.shade = np.ones((self.H, self.W), np.float32)
        self.f = self.W * rng.uniform(0.55, 0.75)
        self.yh = self.H * rng.uniform(0.36, 0.48)
        self.xv = self.W * rng.uniform(0.42, 0.58)
        self.cam = rng.uniform(1.3, 1.7)
        self.near = 0.9 * self.f * self.cam / (self.H - self.yh)  # nearest ground depth in view

    def depth(self, lo: float, hi: float, n: int | None = None):
        """Uniform depth(s) in [lo, hi], kept beyond the nearest visible ground (wide, short frames see far)."""
        lo = max(lo, self.near + 1)
        return self.rng.uniform(lo, max(hi, lo + 1), n)

    def px(self, X, Z, d) -> np.ndarray:
        X, Z, d = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (X, Z, d)))
        s = self.f / d
        return np.stack([self.xv + X * s, self.yh + (self.cam - Z) * s], -1)

    def quad(self, X, Z, d) -> np.ndarray:
        """(n, 4, 2) pixel quads from four corners, each corner's X, Z, d scalars or arrays (broadcast)."""
        return np.stack(np.broadcast_arrays(*(self.px(*c) for c in zip(X, Z, d))), -2).reshape(-1, 4, 2)

    def front(self, x0, x1, z0, z1, d) -> np.ndarray:
        return self.quad((x0, x1, x1, x0), (z0, z0, z1, z1), (d, d, d, d))

    def side(self, X, z0, z1, u0, u1) -> np.ndarray:
        return self.quad((X, X, X, X), (z0, z0, z1, z1), (u0, u1, u1, u0))

    def ground(self, x0, x1, d0, d1) -> np.ndarray:
        return self.quad((x0, x1, x1, x0), (0, 0, 0, 0), (d0, d0, d1, d1))

    def fill(self, polys, colour, label: int | None) -> None:
        # 4 bits of sub-pixel precision keep thin far-away structures (poles, fences) in place
        pts = [np.round(np.asarray(p) * 16).astype(np.int32) for p in polys]
        cv2.fillPoly(self.img, pts, tuple(int(c) for c in colour), cv2.LINE_8, 4)
        if label is not None:
            cv2.fillPoly(self.lab, pts, (label,), cv2.LINE_8, 4)

    def lines(self, polys, colour, label: int | None, width_px: float, closed: bool = False) -> None:
        pts = [np.round(np.asarray(p) * 16).astype(np.int32) for p in polys]
        t = max(1, round(width_px))
        cv2.polylines(self.img, pts, closed, tuple(int(c) for c in colour), t, cv2.LINE_8, 4)
        if label is not None:
            cv2.polylines(self.lab, pts, closed, (label,), t, cv2.LINE_8, 4)

    def disc(self, centre, radius_px: float, colour, label: int | None) -> None:
        c, r = tuple(int(v) for v in np.round(np.asarray(centre) * 16)), max(8, round(radius_px * 16))
        cv2.circle(self.img, c, r, tuple(int(v) for v in colour), -1, cv2.LINE_8, 4)
        if label is not None:
            cv2.circle(self.lab, c, r, (label,), -1, cv2.LINE_8, 4)

    def colour(self, base, spread: float = 18.0) -> tuple[int, ...]:
        return tuple(np.clip(np.asarray(base) + self.rng.normal(0, spread, 3), 0, 255).astype(int).tolist())


def _ring(u, z, r, n=14) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return u + r * np.cos(t), z + r * np.sin(t)


def paint_sky(sc: Scene) -> None:
    top = np.array(sc.rng.choice([(70, 120, 200), (150, 155, 165), (110, 150, 205), (120, 110, 160)]), np.float32)
    horizon = np.clip(top + sc.rng.uniform(30, 80), 0, 255)
    t = np.clip(np.arange(sc.H, dtype=np.float32) / sc.yh, 0, 1)[:, None, None]
    clouds = cv2.resize(sc.rng.random((3, 6), dtype=np.float32), (sc.W, sc.H), interpolation=cv2.INTER_CUBIC)
    sky = top * (1 - t) + horizon * t + np.clip(clouds - 0.5, 0, 1)[..., None] * sc.rng.uniform(0, 160)
    sc.img[:] = np.clip(sky, 0, 255).astype(np.uint8)
    sc.lab[:] = SKY


def plan_street(sc: Scene, index: int) -> dict:
    """Road edges, verges, sidewalks and what lines each side; ensures buildings and terrain appear."""
    rng = sc.rng
    st = {"left": -rng.uniform(3.0, 7.5), "right": rng.uniform(3.0, 7.5), "sides": {}}
    kinds = ["city" if rng.random() < 0.7 else "park" for _ in range(2)]
    if kinds == ["park", "park"]:
        kinds[index % 2] = "city"
    for s, kind in zip((-1, 1), kinds):
        verge = rng.uniform(0.6, 2.0) if rng.random() < 0.35 else 0.0
        edge = abs(st["left" if s < 0 else "right"])
        walk = rng.uniform(1.5, 4.0)
        st["sides"][s] = {"kind": kind, "road": edge, "verge": verge, "inner": edge + verge,
                          "edge": edge + verge + walk}
    if "park" not in kinds and all(v["verge"] == 0 for v in st["sides"].values()):
        side = st["sides"][(-1, 1)[index % 2]]
        side["verge"] = 1.2
        side["inner"] += 1.2
        side["edge"] += 1.2
    return st


def paint_ground(sc: Scene, st: dict, rails: float | None) -> None:
    rng, far = sc.rng, 400.0
    sc.fill([np.array([[0, sc.yh], [sc.W, sc.yh], [sc.W, sc.H], [0, sc.H]])], sc.colour((95, 120, 60)), TERRAIN)
    for s, side in st["sides"].items():
        out = (GROUND, (120, 118, 112)) if side["kind"] == "city" else (TERRAIN, (100, 130, 60))
        sc.fill(sc.ground(s * side["edge"], s * 40, sc.near, far), sc.colour(out[1]), out[0])
        walk = sc.colour((175, 170, 165))
        sc.fill(sc.ground(s * side["inner"], s * side["edge"], sc.near, far), walk, SIDEWALK)
        curb = sc.ground(s * side["inner"], s * (side["inner"] + 0.2), sc.near, far)
        sc.fill(curb, sc.colour((205, 205, 200)), SIDEWALK)
        seams = np.arange(sc.near, 80, rng.uniform(1.0, 2.0))
        sc.fill(sc.ground(s * side["inner"], s * side["edge"], seams, seams + 0.05), np.array(walk) * 0.8, None)
        if side["verge"]:
            sc.fill(sc.ground(s * side["road"], s * side["inner"], sc.near, far), sc.colour((90, 125, 55)), TERRAIN)
    left, right = st["left"], st["right"]
    sc.fill(sc.ground(left, right, sc.near, far), sc.colour((85, 85, 90), 10), ROAD)
    for _ in range(rng.integers(0, 4)):  # patches of newer asphalt
        x, d = rng.uniform(left, right), rng.uniform(sc.near, 40)
        sc.fill(sc.ground(x, x + rng.uniform(0.5, 3), d, d + rng.uniform(0.5, 6)), sc.colour((70, 70, 75), 8), ROAD)
    lanes = max(1, round((right - left) / 3.3))
    marks = sc.colour((235, 235, 225), 8)
    for k in range(1, lanes):
        x = left + k * (right - left) / lanes
        d = np.arange(sc.near + rng.uniform(0, 9), 150, 9.0)
        sc.fill(sc.ground(x - 0.07, x + 0.07, d, d + 3.0), marks, ROAD)
    if rng.random() < 0.5:
        for x in (left + 0.25, right - 0.25):
            sc.fill(sc.ground(x - 0.07, x + 0.07, sc.near, far), marks, ROAD)
    if rng.random() < 0.3:  # zebra crossing
        d, x = rng.uniform(8, 30), np.arange(left + 0.3, right - 0.5, 1.0)
        sc.fill(sc.ground(x, x + 0.5, d, d + 3.0), marks, ROAD)
    if rails is not None:
        sc.fill(sc.ground(rails - 1.0, rails + 1.0, sc.near, far), sc.colour((95, 90, 85), 8), RAIL)
        for x in (rails - 0.72, rails + 0.72):
            sc.fill(sc.ground(x - 0.04, x + 0.04, sc.near, far), (160, 160, 165), RAIL)
    if rng.random() < 0.6:  # a building's shadow falling across the road
        s = rng.choice((-1, 1))
        edge, d = st["sides"][s]["edge"], rng.uniform(sc.near, 30)
        shadow = sc.ground(s * edge, s * (edge - rng.uniform(3, 12)), d, d + rng.uniform(5, 40))
        cv2.fillPoly(sc.shade, [np.round(shadow[0] * 16).astype(np.int32)], rng.uniform(0.5, 0.75), cv2.LINE_8, 4)


def paint_skyline(sc: Scene) -> None:
    d = 260.0
    x, x_end = -sc.xv * d / sc.f, (sc.W - sc.xv) * d / sc.f
    while x < x_end:
        w = sc.rng.uniform(10, 40)
        if sc.rng.random() < 0.6:
            sc.fill(sc.front(x, x + w, 0, sc.rng.uniform(8, 60), d), sc.colour((140, 145, 160), 12), BUILDING)
        else:
            sc.disc(sc.px(x + w / 2, 0, d), w * sc.f / d * 0.7, sc.colour((70, 95, 60), 10), VEGETATION)
        x += w


def paint_buildings(sc: Scene, s: int, edge: float) -> None:
    rng, d, blocks = sc.rng, sc.near * 0.7, []
    while d < 160:
        length = rng.uniform(6, 26)
        blocks.append((d, d + length, s * (edge + rng.uniform(0.2, 2.0)), rng.uniform(6, 30)))
        d += length + (rng.uniform(2, 8) if rng.random() < 0.2 else 0)
    for d0, d1, X, Z in reversed(blocks):  # far first: nearer blocks occlude farther ones
        wall = np.asarray(sc.colour(rng.choice(FACADES), 14))
        sc.fill(sc.front(X, X + s * 12, 0, Z, d0), wall * 0.75, BUILDING)
        sc.fill(sc.side(X, 0, Z, d0, d1), wall, BUILDING)
        pitch, size = rng.uniform(2.5, 4.0), rng.uniform(1.0, 1.6)
        u, z = np.meshgrid(np.arange(d0 + 0.8, d1 - size, pitch), np.arange(rng.uniform(1.0, 2.0), Z - 1.8, 3.1))
        keep = 1.4 * sc.f / (u + size) > 1.0  # windows smaller than a pixel are not worth drawing
        u, z = u[keep], z[keep]
        if u.size:
            lit = rng.random(u.size) < rng.uniform(0, 0.4)
            for mask, glass in ((lit, (230, 215, 150)), (~lit, (45, 55, 70))):
                if mask.any():
                    sc.fill(sc.side(X, z[mask], z[mask] + 1.4, u[mask], u[mask] + size), sc.colour(glass, 12),
                            BUILDING)


def paint_barrier(sc: Scene, X: float, d0: float, d1: float, label: int) -> None:
    """A wall (solid, with a cap) or a fence (posts and rails) along the sidewalk's outer edge."""
    rng = sc.rng
    if label == WALL:
        h, c = rng.uniform(0.8, 2.5), np.asarray(sc.colour((150, 145, 135)))
        sc.fill(sc.side(X, 0, h, d0, d1), c, WALL)
        sc.fill(sc.side(X, h - 0.12, h, d0, d1), c * 1.15, WALL)
        return
    h, c = rng.uniform(1.0, 1.8), sc.colour((110, 100, 90) if rng.random() < 0.5 else (60, 80, 60))
    for u in np.arange(d0, d1, rng.uniform(1.5, 3.0)):
        sc.fill(sc.front(X - 0.05, X + 0.05, 0, h, u), c, FENCE)
    for z in (h - 0.08, h * 0.45):
        sc.fill(sc.side(X, z, z + 0.08, d0, d1), c, FENCE)


def paint_tree(sc: Scene, X: float, d: float) -> None:
    rng = sc.rng
    trunk, r = rng.uniform(1.8, 4.5), rng.uniform(1.2, 3.5)
    sc.fill(sc.front(X - 0.15, X + 0.15, 0, trunk + r * 0.5, d), sc.colour((90, 70, 50), 10), VEGETATION)
    green = np.array(sc.colour((60, 110, 45), 15))
    for _ in range(rng.integers(7, 14)):
        c = sc.px(X + rng.normal(0, r * 0.45), trunk + r + rng.normal(0, r * 0.35), d)
        sc.disc(c, r * rng.uniform(0.35, 0.7) * sc.f / d, green + rng.normal(0, 12, 3), VEGETATION)


def paint_person(sc: Scene, X: float, d: float, label: int = PERSON) -> None:
    rng = sc.rng
    h, stride = rng.uniform(1.5, 1.9), rng.uniform(0, 0.12)
    shirt, trousers, skin = sc.colour(rng.integers(0, 256, 3), 0), sc.colour((50, 50, 70), 25), SKIN[rng.integers(4)]
    for side in (-1, 1):  # legs, then arms; coordinates are fractions of the height
        sc.fill(sc.quad([X + h * side * x for x in (0.01, 0.10, 0.04 + stride, -0.03 + stride)],
                        [h * z for z in (0.5, 0.5, 0, 0)], [d] * 4), trousers, label)
        arm = sc.px(X + h * side * np.array([0.12, 0.17 + stride]), h * np.array([0.8, 0.48]), d)
        sc.lines([arm], shirt, label, 0.045 * h * sc.f / d)
    sc.fill(sc.quad([X + h * x for x in (-0.13, 0.13, 0.11, -0.11)], [h * z for z in (0.82, 0.82, 0.47, 0.47)],
                    [d] * 4), shirt, label)
    sc.disc(sc.px(X, 0.9 * h, d), 0.065 * h * sc.f / d, skin, label)


def paint_two_wheeler(sc: Scene, X: float, d: float, label: int, rider: bool) -> None:
    """A bicycle or motorcycle seen from the side, in the plane X = const, with an optional rider on it."""
    rng, s = sc.rng, sc.f / d
    flip = rng.random() < 0.5

    def plane(u, z):
        u = np.asarray(u, np.float64)
        return sc.px(X, z, d + (1.75 - u if flip else u))

    frame = sc.colour((30, 30, 30) if label == MOTORCYCLE else rng.integers(0, 256, 3), 10)
    r = 0.3 if label == MOTORCYCLE else 0.34
    for hub in (0.35, 1.4):
        sc.lines([plane(*_ring(hub, r, r))], (25, 25, 25), label, (0.09 if label == MOTORCYCLE else 0.05) * s, True)
    if label == MOTORCYCLE:
        sc.fill([plane([0.35, 0.5, 1.0, 1.35, 1.45, 0.9], [0.35, 0.8, 0.85, 0.6, 0.35, 0.3])], frame, label)
    else:
        sc.lines([plane([0.35, 0.65, 0.8, 0.35], [0.34, 0.95, 0.34, 0.34]),
                  plane([0.65, 1.25, 0.8], [0.95, 0.95, 0.34]), plane([1.4, 1.25, 1.2], [0.34, 0.95, 1.1])],
                 frame, label, 0.04 * s)
    if rider:
        clothes, skin = sc.colour(rng.integers(0, 256, 3), 0), SKIN[rng.integers(4)]
        sc.lines([plane([0.8, 0.95, 0.65], [0.4, 0.75, 0.95])], sc.colour((50, 50, 70)), RIDER, 0.12 * s)
        sc.lines([plane([0.65, 0.95], [0.95, 1.5]), plane([0.95, 1.22], [1.45, 1.1])], clothes, RIDER, 0.22 * s)
        sc.disc(plane(1.0, 1.68), 0.11 * s, skin, RIDER)


def paint_vehicle(sc: Scene, X: float, d: float, label: int) -> None:
    """A car, truck, bus or tram seen from behind, with its near side when it is off the camera's axis."""
    rng = sc.rng
    width, length, bottom, top, roof = VEHICLES[label]
    w, L, z0, z1 = (rng.uniform(*r) for r in (width, length, bottom, top))
    z2 = rng.uniform(*roof) if roof else 0.0
    x0, x1 = X - w / 2, X + w / 2
    paint = np.asarray(sc.colour(rng.choice(PAINT) if label != TRAIN else (220, 190, 40), 15))
    dark = sc.colour((30, 32, 36), 6)
    shadow = sc.ground(x0 - 0.2, x1 + 0.2, d - 0.3, d + L)
    cv2.fillPoly(sc.shade, [np.round(shadow[0] * 16).astype(np.int32)], 0.45, cv2.LINE_8, 4)
    if x1 < 0 or x0 > 0:
        Xs = x1 if x1 < 0 else x0
        for u in (0.18, 0.82) if L < 6 else (0.1, 0.25, 0.8):
            wheel_u, wheel_z = _ring(d + u * L, 0.38, 0.38)
            sc.fill([sc.px(Xs, wheel_z, wheel_u)], dark, label)
        sc.fill(sc.side(Xs, z0, z1, d, d + L), paint * 0.8, label)
        if roof:
            sc.fill(sc.quad([Xs] * 4, [z1, z1, z2, z2], [d + 0.25 * L, d + 0.85 * L, d + 0.7 * L, d + 0.4 * L]),
                    paint * 0.8, label)
            sc.fill(sc.quad([Xs] * 4, [z1 + 0.05, z1 + 0.05, z2 - 0.05, z2 - 0.05],
                            [d + 0.3 * L, d + 0.8 * L, d + 0.67 * L, d + 0.43 * L]), dark, label)
        elif label != TRUCK:
            sc.fill(sc.side(Xs, z0 + 0.45 * (z1 - z0), z1 - 0.35, d + 0.5, d + L - 0.5), dark, label)
    for a, b in ((x0 + 0.02, x0 + 0.25 * w), (x1 - 0.25 * w, x1 - 0.02)):
        sc.fill(sc.front(a, b, 0, z0 + 0.15, d), dark, label)
    sc.fill(sc.front(x0, x1, z0, z1, d), paint, label)
    if roof:
        sc.fill(sc.quad([x0 + 0.08 * w, x1 - 0.08 * w, x1 - 0.18 * w, x0 + 0.18 * w], [z1, z1, z2, z2], [d] * 4),
                paint, label)
        sc.fill(sc.front(x0 + 0.2 * w, x1 - 0.2 * w, z1 + 0.05, z2 - 0.06, d), dark, label)
        for a in (x0 + 0.03 * w, x1 - 0.18 * w):
            sc.fill(sc.front(a, a + 0.15 * w, z1 - 0.22, z1 - 0.07, d), (200, 20, 20), label)
        sc.fill(sc.front(X - 0.25, X + 0.25, z0 + 0.1, z0 + 0.22, d), (235, 235, 235), label)
    elif label == TRUCK:
        sc.fill(sc.front(X - 0.02, X + 0.02, z0 + 0.1, z1 - 0.1, d), paint * 0.6, label)
    else:
        sc.fill(sc.front(x0 + 0.15, x1 - 0.15, z1 - 1.2, z1 - 0.3, d), dark, label)
        if label == TRAIN:  # pantograph
            sc.lines([sc.px([X - 0.4, X, X + 0.4], [z1, z1 + 0.8, z1], d)], dark, label, 0.05 * sc.f / d)


def paint_pole(sc: Scene, X: float, d: float, height: float, arm: float = 0.0) -> None:
    """A pole; with a signed `arm` (towards the road) it is a street lamp: arm and lamp head count as pole."""
    grey = sc.colour((150, 150, 150), 20)
    sc.fill(sc.front(X - 0.09, X + 0.09, 0, height, d), grey, POLE)
    if arm:
        sc.fill(sc.front(X, X + arm, height - 0.12, height, d), grey, POLE)
        end = X + arm
        sc.fill(sc.front(end - 0.3 * np.sign(arm), end, height - 0.25, height, d), (225, 225, 210), POLE)


def paint_sign(sc: Scene, X: float, d: float) -> None:
    rng, s = sc.rng, sc.f / d
    z, r = rng.uniform(2.0, 2.8), rng.uniform(0.3, 0.45)
    paint_pole(sc, X, d, z + r)
    centre = sc.px(X, z, d)
    kind = rng.integers(4)
    if kind == 0:  # prohibitory: red ring, white inside
        sc.disc(centre, r * s, sc.colour((200, 30, 30), 10), SIGN)
        sc.disc(centre, 0.7 * r * s, (235, 235, 235), None)
    elif kind == 1:  # warning triangle
        tri = sc.px(X + r * np.array([-1.0, 1.0, 0.0]), z + r * np.array([-0.8, -0.8, 0.9]), d)
        sc.fill([tri], sc.colour((200, 30, 30), 10), SIGN)
        sc.fill([centre + (tri - centre) * 0.6], (235, 235, 235), None)
    else:  # blue square or a wide street-name plate
        wide = 2.2 if kind == 3 else 1.0
        sc.fill(sc.front(X - r * wide, X + r * wide, z - r * 0.8, z + r * 0.8, d),
                sc.colour((30, 80, 170) if kind == 2 else (30, 120, 70), 15), SIGN)


def paint_traffic_light(sc: Scene, X: float, d: float, over: float | None) -> None:
    """A three-lamp signal on a short pole, or hung from a mast arm over the road at X = `over`."""
    rng = sc.rng
    if over is None:
        top, x = rng.uniform(2.4, 3.2), X
        paint_pole(sc, X, d, top)
    else:
        top, x = rng.uniform(4.6, 5.2), over
        paint_pole(sc, X, d, top + 1.05, over - X)
    box = sc.colour((35, 35, 35) if rng.random() < 0.7 else (200, 170, 40), 8)
    sc.fill(sc.front(x - 0.16, x + 0.16, top, top + 0.95, d), box, LIGHT)
    if rng.random() < 0.75:  # we see the lamps; otherwise its back
        lit = rng.integers(3)
        for k in range(3):
            sc.disc(sc.px(x, top + 0.78 - 0.3 * k, d), 0.09 * sc.f / d,
                    LAMPS[k] if k == lit else (55, 55, 50), None)


def paint_clutter(sc: Scene, X: float, d: float, height: float) -> None:
    sc.fill(sc.front(X - 0.3, X + 0.3, 0, height, d), sc.colour((60, 80, 60), 25), STATIC)


def plan_objects(sc: Scene, st: dict, index: int) -> tuple[list, float | None]:
    """Everything standing on the street as (depth, painter, args); every class gets at least one instance,
    the rare vehicles by turns of `index`, so even a handful of images covers all 19 classes."""
    rng, objs = sc.rng, []
    left, right = st["left"], st["right"]
    lanes = max(1, round((right - left) / 3.3))
    lane = [left + (k + 0.5) * (right - left) / lanes for k in range(lanes)]

    def walk(s, margin=0.4):  # a lateral position on side s's sidewalk
        side = st["sides"][s]
        return s * rng.uniform(side["inner"] + margin, max(side["inner"] + margin, side["edge"] - margin))

    far = sc.depth
    heavy = (TRUCK, BUS, TRAIN)[index % 3]
    rails = None
    for label in [heavy] + [v for v in (TRUCK, BUS) if rng.random() < 0.25]:
        x = lane[rng.integers(lanes)] if label != TRAIN else lane[lanes // 2]
        rails = x if label == TRAIN else rails
        objs.append((far(10, 30) if label == heavy else far(15, 80), paint_vehicle, (x, label)))
    for i in range(1 + rng.poisson(2.5)):
        objs.append((far(6, 25) if i == 0 else far(6, 70), paint_vehicle, (lane[rng.integers(lanes)], CAR)))
    s = rng.choice((-1, 1))
    curb = st["left"] + 1.1 if s < 0 else st["right"] - 1.1
    for d in np.arange(rng.uniform(4, 10), 60, rng.uniform(5.5, 7)):
        if rng.random() < 0.5:
            objs.append((max(d, sc.near), paint_vehicle, (curb, CAR)))
    wheels = (BICYCLE, MOTORCYCLE)[index % 2]
    for label in [wheels] + [(BICYCLE, MOTORCYCLE)[rng.integers(2)] for _ in range(rng.poisson(0.5))]:
        x = left + 0.8 if rng.random() < 0.5 else right - 0.8
        objs.append((far(8, 25), paint_two_wheeler, (x, label, True)))
    for _ in range(rng.poisson(0.7)):
        objs.append((far(5, 40), paint_two_wheeler, (walk(rng.choice((-1, 1))), BICYCLE, False)))
    for i in range(1 + rng.poisson(3)):
        objs.append((far(8, 22) if i == 0 else far(5, 60), paint_person, (walk(rng.choice((-1, 1))),)))
    if rng.random() < 0.3:
        d = far(8, 30)
        for x in rng.uniform(left, right, rng.integers(1, 4)):
            objs.append((d + rng.uniform(0, 2), paint_person, (x,)))
    s = rng.choice((-1, 1))
    pole_x = s * (st["sides"][s]["inner"] + 0.4)
    for d in np.arange(rng.uniform(5, 15), 120, rng.uniform(15, 30)):
        objs.append((max(d, sc.near), paint_pole, (pole_x, rng.uniform(6, 9), -s * rng.uniform(0.8, 1.8))))
    for i in range(1 + rng.poisson(1)):
        objs.append((far(8, 30) if i == 0 else far(6, 60), paint_sign, (walk(rng.choice((-1, 1)), 0.3),)))
    for i in range(1 + rng.poisson(0.6)):
        s = rng.choice((-1, 1))
        over = lane[rng.integers(lanes)] if rng.random() < 0.5 else None
        x = s * (st["sides"][s]["inner"] + 0.4)
        objs.append((far(10, 35) if i == 0 else far(6, 60), paint_traffic_light, (x, over)))
    for s, side in st["sides"].items():
        if side["kind"] == "city" and rng.random() < 0.5:
            for d in np.arange(rng.uniform(4, 12), 90, rng.uniform(8, 15)):
                objs.append((max(d, sc.near), paint_tree, (s * (side["edge"] - 0.8),)))
    for _ in range(rng.poisson(0.8)):  # bins and boxes: Cityscapes' "static", ignored
        objs.append((far(5, 30), paint_clutter, (walk(rng.choice((-1, 1))), rng.uniform(0.6, 1.2))))
    return objs, rails


def render(size: tuple[int, int], seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: RGB uint8 and Cityscapes labelIds uint8, a pure function of (size, seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    sc = Scene(rng, size)
    st = plan_street(sc, index)
    objs, rails = plan_objects(sc, st, index)
    paint_sky(sc)
    paint_skyline(sc)
    paint_ground(sc, st, rails)
    for s, side in st["sides"].items():
        if side["kind"] == "city":
            paint_buildings(sc, s, side["edge"])
        else:
            for d in sorted(sc.depth(sc.near + 2, 80, rng.integers(3, 9)))[::-1]:
                paint_tree(sc, s * (side["edge"] + rng.uniform(1.5, 14)), d)
    barriers = [WALL, FENCE] if rng.random() < 0.5 else [FENCE, WALL]
    for s, label in zip((-1, 1), barriers):
        side = st["sides"][s]
        if label == FENCE and side["kind"] == "park":
            d0, d1 = sc.near, rng.uniform(40, 120)
        else:
            d0 = sc.depth(sc.near + 2, 30)
            d1 = d0 + rng.uniform(5, 20)
        paint_barrier(sc, s * (side["edge"] + 0.1), d0, d1, label)
    for d, paint, args in sorted(objs, key=lambda o: -o[0]):  # painter's algorithm: far to near
        paint(sc, args[0], d, *args[1:])
    if rng.random() < 0.5:  # the ego vehicle's bonnet, as at the bottom of Cityscapes frames
        x = np.linspace(0, sc.W, 17)
        y = sc.H - sc.H * rng.uniform(0.04, 0.1) * (1 - ((x - sc.W / 2) / (0.8 * sc.W)) ** 2)
        sc.fill([np.concatenate([np.stack([x, y], 1), [[sc.W, sc.H], [0, sc.H]]])], sc.colour((40, 40, 45)), EGO)
    return finish(sc), sc.lab


def finish(sc: Scene) -> np.ndarray:
    """Lighting, texture, blur and sensor noise on the painted image (the labels stay sharp)."""
    rng, (H, W) = sc.rng, (sc.H, sc.W)
    x = sc.img.astype(np.float32) * sc.shade[..., None]
    low = cv2.resize(rng.standard_normal((H // 16 + 2, W // 16 + 2), dtype=np.float32), (W, H),
                     interpolation=cv2.INTER_CUBIC)
    x *= (1 + 0.07 * low)[..., None]
    x += (rng.standard_normal((H, W), dtype=np.float32) * TEXTURE[sc.lab])[..., None]
    x = x * rng.uniform(0.6, 1.25) * rng.uniform(0.9, 1.1, 3).astype(np.float32) + rng.uniform(-15, 15)
    x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.1))
    x += rng.standard_normal((H, W, 3), dtype=np.float32) * rng.uniform(1, 4)
    return np.clip(x, 0, 255).astype(np.uint8)


def _sample_paths(root: Path, split: str, index: int, count: int) -> tuple[Path, Path]:
    cities = CITIES[split]
    city = cities[index * len(cities) // count]
    stem = f"{city}_{index:06d}_{19:06d}"  # Cityscapes' annotated frame is the 20th of each snippet
    return (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise DataError(f"{path}: could not write the image")


def _params(train: int, val: int, size, seed: int) -> dict:
    return {"version": VERSION, "train": int(train), "val": int(val), "size": [int(size[0]), int(size[1])],
            "seed": int(seed), "layout": "cityscapes", "labels": "labelIds"}


def _refuse_foreign(root: Path) -> None:
    if root.exists() and not (root / "synthetic.json").is_file() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not a generated synthetic dataset (no synthetic.json); refusing to "
                        "overwrite it, choose another data.root")


def generate_synthetic(root: str | os.PathLike, train: int = 300, val: int = 60, size: tuple[int, int] = (256, 512),
                       seed: int = 0, progress: bool = True) -> Path:
    """Write `train` + `val` street scenes of `size` (H, W) to `root` in the Cityscapes layout, with labelIds
    ground truth and `synthetic.json`; built in a temp folder beside `root` and renamed into place."""
    root = Path(root)
    _refuse_foreign(root)
    if min(size) < 16 or train < 1 or val < 0:
        raise ConfigError(f"synthetic set {root}: cannot make {train} train + {val} val images of {size[0]}x{size[1]} "
                          "(need train >= 1, val >= 0, sides >= 16)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(split, i, n) for split, n in (("train", train), ("val", val)) for i in range(n)]
    log.info("generating %d synthetic street scenes of %dx%d in %s", len(jobs), size[0], size[1], root)
    try:
        for split, i, n in tqdm(jobs, desc="synthetic scenes", unit="img", disable=not progress, leave=False,
                                mininterval=progress_interval()):
            rgb, label = render((int(size[0]), int(size[1])), seed, split, i)
            image_path, label_path = _sample_paths(tmp, split, i, n)
            _write(image_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            _write(label_path, label)
        (tmp / "synthetic.json").write_text(json.dumps(_params(train, val, size, seed), indent=2) + "\n")
        old = root.parent / f".{root.name}.old{os.getpid()}"
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_synthetic(root: str | os.PathLike, train: int = 300, val: int = 60, size: tuple[int, int] = (256, 512),
                     seed: int = 0, progress: bool = True) -> Path:
    """`root` if it already holds the synthetic set with these parameters, otherwise (re)generate it there; a
    folder that is not ours (no synthetic.json, not empty) is refused rather than overwritten."""
    root = Path(root)
    meta = root / "synthetic.json"
    if meta.is_file():
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError):
            found = None
        if found == _params(train, val, size, seed) and (root / "leftImg8bit").is_dir():
            return root
        log.info("%s holds other synthetic parameters (%s): regenerating", root, found)
    return generate_synthetic(root, train, val, size, seed, progress)
