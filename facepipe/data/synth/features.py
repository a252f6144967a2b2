"""Generated faces, part 3: drawing each facial feature group (hair, ears, eyes, brows, nose, mouth, marks,
extras) under a pose."""

from __future__ import annotations

import math

import cv2
import numpy as np

from facepipe.data.synth.draw import (
    _bgr,
    _blend,
    _ellipse,
    _face_outline,
    _fill,
    _fixed,
    _line,
    _mix,
    _Projector,
)
from facepipe.data.synth.identity import (
    _SUBPIXEL,
    HAIR_STYLES,
    Nuisance,
)


def _draw_hair_back(img: np.ndarray, p: _Projector, face: dict, hair: dict) -> None:
    style = HAIR_STYLES[hair["style"]]
    colour = np.asarray(hair["colour"])
    a, b = face["half_width"], face["half_height"]
    vol = hair["volume"]
    if style == "long":
        length = b * (0.9 + 0.6 * hair["length"])
        w = a * (1.12 + 0.12 * vol)
        t = np.linspace(math.pi, 2 * math.pi, 24)
        top = np.stack([w * np.cos(t), b * face["forehead"] * (1.1 + 0.08 * vol) * np.sin(t)], 1)
        sides = np.array(
            [[w * 1.04, length * 0.6], [w * 0.95, length], [-w * 0.95, length], [-w * 1.04, length * 0.6]]
        )
        _fill(img, p(np.vstack([top, sides]), weight=0.0), _mix(colour, (0, 0, 0), 0.25))
    elif style == "curly":
        rng = np.random.default_rng(hair["strand_seed"])
        for ang in np.linspace(math.pi * 0.9, math.pi * 2.1, 16):
            r = 5.0 + 3.0 * vol + rng.uniform(-1, 1)
            cx = (a * 1.02) * math.cos(ang)
            cy = b * face["forehead"] * 0.98 * math.sin(ang) + (3 if math.sin(ang) > -0.3 else 0)
            _fill(
                img, p(_ellipse(cx, cy, r, r, n=16), weight=0.0), _mix(colour, (0, 0, 0), 0.15 * rng.random())
            )


def _draw_hair_front(img: np.ndarray, p: _Projector, face: dict, hair: dict) -> None:
    style = HAIR_STYLES[hair["style"]]
    colour = np.asarray(hair["colour"])
    a, b = face["half_width"], face["half_height"] * face["forehead"]
    vol = hair["volume"]
    hairline = hair["hairline"] * b
    if style == "bald":
        # a fringe of hair around the sides only
        for side in (-1, 1):
            pts = np.array(
                [
                    [side * a * 1.02, -b * 0.5],
                    [side * a * 1.06, 0.0],
                    [side * a * 0.9, 0.0],
                    [side * a * 0.88, -b * 0.45],
                ]
            )
            _fill(img, p(pts, weight=0.3), colour)
        return
    if style == "fringe":
        hairline = b * 0.3
    cap_r_u, cap_r_v = a * (1.04 + 0.06 * vol), b * (1.04 + 0.1 * vol)
    t = np.linspace(math.pi, 2 * math.pi, 26)
    outer = np.stack([cap_r_u * np.cos(t), cap_r_v * np.sin(t)], 1)
    # hairline from the right temple back to the left one (points go right→left)
    us = np.linspace(a * 1.0, -a * 1.0, 21)
    line_v = -hairline + 0.45 * hairline * (np.abs(us) / a) ** 2.5
    if style == "side_part":
        line_v = line_v + 0.25 * hairline * hair["part"] * (us / a)
    if style == "fringe":
        rng = np.random.default_rng(hair["strand_seed"])
        line_v = line_v + np.where(np.arange(us.size) % 2 == 0, 0, -2.5 - rng.uniform(0, 2, us.size))
    sideburn = np.array([[a * 1.04, b * 0.05], [a * 0.86, b * 0.05]])
    sideburn_l = np.array([[-a * 0.86, b * 0.05], [-a * 1.04, b * 0.05]])
    inner = np.vstack([sideburn, np.stack([us, line_v], 1), sideburn_l])
    pts_outer = p(outer, weight=0.0)
    pts_inner = p(inner, weight=0.8)
    poly = np.vstack([pts_outer, pts_inner])
    _fill(img, poly, colour)
    # strands: a fixed per-identity pattern of lighter and darker lines on the cap
    rng = np.random.default_rng(hair["strand_seed"] + 1)
    for _ in range(7):
        u0 = rng.uniform(-0.8, 0.8) * a
        v0 = -b * rng.uniform(0.75, 1.0)
        v1 = -hairline * rng.uniform(0.9, 1.0)
        pts = np.array([[u0, v0], [u0 + rng.uniform(-4, 4), (v0 + v1) / 2], [u0 + rng.uniform(-6, 6), v1]])
        shade = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
        _line(img, p(pts, weight=0.5), _mix(colour, shade, 0.22), 1.0 * p.k)
    if style == "side_part":
        x = hair["part"] * a * 0.5
        _line(
            img,
            p(np.array([[x, -b * 1.02], [x * 1.1, -hairline * 1.05]]), weight=0.6),
            _mix(colour, (0, 0, 0), 0.5),
            0.8 * p.k,
        )


def _draw_ears(img: np.ndarray, p: _Projector, face: dict, ears: dict, skin: np.ndarray) -> None:
    a = face["half_width"]
    size = ears["size"]
    for side in (-1, 1):
        # the ear on the far side hides behind the head; the near one shows more
        visible = float(np.clip(1.0 - side * p.yaw * 1.8, 0.15, 1.6))
        cx = side * (a * 0.97 + size * 0.25 * ears["protrude"] * visible)
        pts = _ellipse(cx, ears["height"], size * 0.45 * visible, size, n=20)
        _fill(img, p(pts, weight=0.0), _mix(skin, (0, 0, 0), 0.12))
        inner = _ellipse(cx + side * size * 0.05, ears["height"], size * 0.22 * visible, size * 0.6, n=16)
        _line(img, p(inner, weight=0.0), _mix(skin, (0, 0, 0), 0.35), 0.6 * p.k, closed=True)


def _draw_eye(img: np.ndarray, p: _Projector, eyes: dict, side: int, nz: Nuisance, skin: np.ndarray) -> None:
    cx, cy = side * eyes["spacing"], eyes["height"]
    rx, ry = eyes["rx"], eyes["ry"] * nz.eye_open
    tilt = -side * eyes["tilt"]
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c, -s], [s, c]])

    def place(local: np.ndarray) -> np.ndarray:
        return p(local @ rot.T + (cx, cy))

    t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    # almond: flatter lower lid
    lx, ly = rx * np.cos(t), np.where(np.sin(t) < 0, ry * np.sin(t), 0.75 * ry * np.sin(t))
    almond = np.stack([lx, ly], 1)
    if eyes["bags"] > 0.6:
        bag = np.stack([rx * 0.8 * np.cos(t[:15]), ry * 0.9 + 1.2 * np.sin(t[:15])], 1)
        _blend(img, lambda L: _line(L, place(bag), _mix(skin, (0, 0, 0), 0.5), 0.7 * p.k), 0.5)
    _fill(img, place(almond), (235, 238, 240))
    # iris and pupil clipped to the almond, shifted by gaze with the yaw
    gaze = -0.25 * rx * math.sin(p.yaw)
    ir = ry * 0 + eyes["iris_size"] * rx
    iris = _ellipse(gaze, 0.0, ir, ir, n=24)
    lim = np.interp(np.abs(iris[:, 0]), [0, rx], [1, 0]) ** 0.5
    iris[:, 1] = np.clip(iris[:, 1], -ry * lim, 0.75 * ry * lim)
    _fill(img, place(iris), eyes["iris"])
    pupil = _ellipse(gaze, 0.0, ir * 0.45, ir * 0.45, n=16)
    pupil[:, 1] = np.clip(pupil[:, 1], -ry * 0.95, 0.7 * ry)
    _fill(img, place(pupil), (15, 15, 15))
    _fill(img, place(_ellipse(gaze + ir * 0.3, -ir * 0.3, ir * 0.18, ir * 0.18, n=10)), (250, 250, 250))
    # upper lid line (dark, thicker) and lower lid
    upper = almond[t >= math.pi - 1e-9]
    upper = np.vstack([[rx, 0.0], upper[::-1][::-1], [rx, 0.0]])[1:-1]
    _line(img, place(np.vstack([[-rx, 0], almond[(t > math.pi)], [rx, 0]])), (25, 25, 30), 1.1 * p.k)
    if eyes["lid"] > 0.35:
        crease = np.stack([rx * 1.05 * np.cos(t[14:]), ry * (1.2 + 0.8 * eyes["lid"]) * np.sin(t[14:])], 1)
        _line(img, place(crease), _mix(skin, (0, 0, 0), 0.45), 0.6 * p.k)


def _draw_brow(
    img: np.ndarray, p: _Projector, eyes: dict, brows: dict, hair: np.ndarray, side: int, nz: Nuisance
) -> None:
    length = eyes["rx"] * brows["length"]
    cx = side * (eyes["spacing"] + 0.15 * length)
    cy = eyes["height"] - eyes["ry"] - brows["gap"] - 0.6 * nz.brow_raise
    xs = np.linspace(-1, 1, 12)
    # inner end (toward the nose) first; arch is a parabola, slant tilts the brow
    x = cx - side * xs * length
    arch = brows["arch"] * (1 - xs**2) * 1.6
    y = cy - arch + brows["slant"] * xs * 2.5 + brows["inner"] * 0.5 * np.clip(xs, 0, 1) * -1
    thick = brows["thickness"] * (1.0 - 0.45 * np.clip(-xs, 0, 1) - 0.1 * np.clip(xs, 0, 1))
    top = np.stack([x, y - thick / 2], 1)
    bottom = np.stack([x, y + thick / 2], 1)[::-1]
    colour = _mix(hair, (10, 10, 10), brows["darkness"] * 0.7)
    _fill(img, p(np.vstack([top, bottom])), colour)


def _draw_nose(
    img: np.ndarray, p: _Projector, eyes: dict, nose: dict, skin: np.ndarray, light: float
) -> float:
    top = eyes["height"] + 1.0
    tip = top + nose["length"]
    w = nose["width"]
    depth = nose["depth"]
    dark = _mix(skin, (0, 0, 0), 0.35)
    # bridge: a shaded side line; which side depends on the light direction
    side = 1 if math.cos(light) > 0 else -1
    if nose["bridge"] > 0.25:
        ys = np.linspace(top + 1, tip - 1.5, 8)
        xs = side * (0.6 * w * 0.4 + nose["hook"] * 0.6 * np.sin(np.linspace(0, math.pi, 8)))
        pts = p(np.stack([xs, ys], 1), depth=depth * 0.6)
        _blend(img, lambda L: _line(L, pts, dark, 1.0 * p.k), 0.5 + 0.4 * nose["bridge"])
    # tip: a rounded bottom arc and two nostrils
    ang = np.linspace(0.15 * math.pi, 0.85 * math.pi, 12)
    tip_r = w * (0.35 + 0.25 * nose["tip"])
    arc = np.stack([w * 0.6 * np.cos(ang) * 1.4, tip - tip_r + tip_r * np.sin(ang)], 1)
    _blend(img, lambda L: _line(L, p(arc, depth=depth), dark, 1.1 * p.k), 0.85)
    for s in (-1, 1):
        nostril = _ellipse(
            s * w * 0.42, tip - 0.3, 0.9 * nose["nostril"], 0.55 * nose["nostril"], s * 0.3, n=12
        )
        _fill(img, p(nostril, depth=depth * 0.7), _mix(skin, (0, 0, 0), 0.6))
        wing = _ellipse(s * w * 0.62, tip - 1.2, w * 0.28, w * 0.32, n=12)[2:9]
        _blend(img, lambda L, wing=wing: _line(L, p(wing, depth=depth * 0.5), dark, 0.8 * p.k), 0.5)
    return tip


def _draw_mouth(
    img: np.ndarray, p: _Projector, mouth: dict, tip: float, skin: np.ndarray, nz: Nuisance
) -> float:
    cy = tip + mouth["gap"]
    w = mouth["half_width"] * (1 + 0.08 * nz.smile)
    curve = mouth["curve"] + 1.2 * nz.smile
    xs = np.linspace(-1, 1, 15)
    line_y = cy - curve * xs**2 * 1.2
    lip = _mix(_mix(skin, (60, 60, 170), 0.35 + 0.3 * mouth["redness"]), (0, 0, 0), 0.15)
    up = mouth["upper"] * (1 - 0.6 * xs**2)
    cupid = mouth["cupid"] * 0.8 * np.exp(-((np.abs(xs) - 0.2) ** 2) / 0.02)
    upper = np.stack([xs * w, line_y - up - cupid], 1)
    lower = np.stack([xs * w, line_y + mouth["lower"] * (1 - xs**2)], 1)
    line = np.stack([xs * w, line_y], 1)
    _fill(img, p(np.vstack([upper, line[::-1]])), _mix(lip, (0, 0, 0), 0.1))
    _fill(img, p(np.vstack([line, lower[::-1]])), lip)
    _line(img, p(line), _mix(lip, (0, 0, 0), 0.55), 0.9 * p.k)
    return cy


def _draw_marks(
    img: np.ndarray, p: _Projector, face: dict, eyes: dict, marks: dict, skin: np.ndarray, mouth_y: float
) -> None:
    a, b = face["half_width"], face["half_height"]
    dark = _mix(skin, (0, 0, 0), 0.45)
    if marks["wrinkles"] > 0:
        for i in range(1 + int(marks["wrinkles"] * 2.5)):
            v = -b * (0.45 + 0.1 * i)
            xs = np.linspace(-0.45, 0.45, 9) * a
            pts = np.stack([xs, v + 0.8 * np.sin(xs / a * 6 + i)], 1)
            _blend(img, lambda L, pts=pts: _line(L, p(pts), dark, 0.6 * p.k), 0.25 + 0.3 * marks["wrinkles"])
    if marks["folds"] > 0.4:
        for s in (-1, 1):
            pts = np.array([[s * 5.5, eyes["height"] + 9], [s * 8.0, mouth_y - 1], [s * 9.5, mouth_y + 2.5]])
            _blend(img, lambda L, pts=pts: _line(L, p(pts), dark, 0.7 * p.k), 0.5 * marks["folds"])
    if marks["freckles"] > 0:
        rng = np.random.default_rng(marks["freckle_seed"])
        n = int(10 + 30 * marks["freckles"])
        pts = np.stack([rng.uniform(-0.7, 0.7, n) * a, rng.uniform(-0.05, 0.45, n) * b], 1)
        centres = p(pts)

        def dots(L: np.ndarray) -> None:
            for c in centres:
                cv2.circle(
                    L,
                    _fixed(c).tolist(),
                    int(0.5 * p.k * (1 << _SUBPIXEL)),
                    _bgr(dark),
                    -1,
                    cv2.LINE_AA,
                    _SUBPIXEL,
                )

        _blend(img, dots, 0.55)
    for u, v, r in marks["moles"]:
        _fill(img, p(_ellipse(u * a, v * b, r, r, n=12)), _mix(skin, (10, 10, 20), 0.7))
    if marks["dimple"] > 0:
        for s in (-1, 1):
            _blend(
                img,
                lambda L, s=s: _line(
                    L, p(_ellipse(s * a * 0.55, mouth_y - 1, 0.8, 1.8, n=10)[:6]), dark, 0.6 * p.k
                ),
                0.5,
            )


def _draw_extras(
    img: np.ndarray,
    p: _Projector,
    face: dict,
    eyes: dict,
    extras: dict,
    hair: np.ndarray,
    tip: float,
    mouth_y: float,
) -> None:
    a = face["half_width"]
    beard = extras["beard"]
    colour = _mix(hair, (0, 0, 0), 0.2)
    if beard in (1, 3):
        outline = _face_outline(face, grow=0.3)
        lower = outline[(outline[:, 1] > tip - 2)]
        lower = lower[np.argsort(np.arctan2(lower[:, 1], lower[:, 0]))]
        jaw = np.vstack([lower, [[-a * 0.55, tip + 1], [a * 0.55, tip + 1]]])
        alpha = 0.25 + 0.25 * extras["beard_density"] if beard == 1 else 0.7 + 0.3 * extras["beard_density"]
        _blend(img, lambda L: _fill(L, p(jaw, weight=0.5), colour), alpha)
    if beard in (2, 3):
        xs = np.linspace(-1, 1, 11)
        top = np.stack([xs * 8.0, tip + 1.2 + 0.8 * xs**2], 1)
        bottom = np.stack([xs * 9.5, mouth_y - 1.2 + 2.5 * xs**2], 1)[::-1]
        _blend(
            img, lambda L: _fill(L, p(np.vstack([top, bottom])), colour), 0.6 + 0.4 * extras["beard_density"]
        )
    if extras["glasses"]:
        frame = extras["frame"]
        r = eyes["rx"] * 1.45
        for s in (-1, 1):
            cx, cy = s * eyes["spacing"], eyes["height"] + 0.3
            if extras["glasses"] == 1:
                pts = _ellipse(cx, cy, r, r * 0.85, n=28)
            else:
                pts = np.array(
                    [
                        [cx - r, cy - r * 0.7],
                        [cx + r, cy - r * 0.7],
                        [cx + r, cy + r * 0.7],
                        [cx - r, cy + r * 0.7],
                    ]
                )
            _line(img, p(pts), frame, 1.0 * p.k, closed=True)
            _line(
                img,
                p(np.array([[s * (eyes["spacing"] + r), cy], [s * a * 1.02, cy - 1]]), weight=0.5),
                frame,
                0.9 * p.k,
            )
        bridge = np.array(
            [
                [-eyes["spacing"] + r, eyes["height"]],
                [0, eyes["height"] - 1],
                [eyes["spacing"] - r, eyes["height"]],
            ]
        )
        _line(img, p(bridge, depth=2.0), frame, 0.9 * p.k)
