"""Raw-pixel and HOG baselines on a generated pair set: how far plain image similarity gets (the generator
keeps both well under their limits, so a network has to learn identity)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from facepipe.data.synth.spec import (
    CLEAN_MAX,
    PairSet,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- baselines


def decode_grey(images: Sequence[bytes]) -> np.ndarray:
    import cv2

    out = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in images]
    return np.stack(out)


def pixel_features(grey: np.ndarray) -> np.ndarray:
    """Flattened greyscale, each image's mean removed: the raw-pixel baseline's feature."""
    flat = grey.reshape(len(grey), -1).astype(np.float32)
    return flat - flat.mean(axis=1, keepdims=True)


def hog_features(grey: np.ndarray, cell: int = 8, bins: int = 9, chunk: int = 256) -> np.ndarray:
    """Dalal-Triggs HOG in numpy (OpenCV 5 dropped HOGDescriptor): centred [-1, 0, 1] gradients, unsigned
    orientation in `bins` bins with linear vote splitting, `cell`-pixel cells, 2x2-cell blocks at a
    one-cell stride, L2-Hys normalised (clip 0.2). Works through `chunk` images at a time."""
    return np.concatenate([_hog_chunk(grey[i : i + chunk], cell, bins) for i in range(0, len(grey), chunk)])


def _hog_chunk(grey: np.ndarray, cell: int, bins: int) -> np.ndarray:
    n, h, w = grey.shape
    ch, cw = h // cell, w // cell
    g = grey[:, : ch * cell, : cw * cell].astype(np.float32)
    gx = np.zeros_like(g)
    gy = np.zeros_like(g)
    gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
    gy[:, 1:-1, :] = g[:, 2:, :] - g[:, :-2, :]
    mag = np.hypot(gx, gy)
    pos = (np.rad2deg(np.arctan2(gy, gx)) % 180.0) / (180.0 / bins) - 0.5  # bin centres at (i + 0.5) * width
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    # flat histogram index of each pixel's cell; the two votes go to bins lo and lo + 1 (wrapping)
    cell_of = (np.arange(ch * cell) // cell)[:, None] * cw + (np.arange(cw * cell) // cell)[None, :]
    base = (np.arange(n)[:, None, None] * (ch * cw) + cell_of[None]) * bins
    size = n * ch * cw * bins
    hist = np.bincount((base + lo % bins).ravel(), (mag * (1 - frac)).ravel(), minlength=size)
    hist += np.bincount((base + (lo + 1) % bins).ravel(), (mag * frac).ravel(), minlength=size)
    hist = hist.reshape(n, ch, cw, bins)
    blocks = np.concatenate(
        [hist[:, :-1, :-1], hist[:, 1:, :-1], hist[:, :-1, 1:], hist[:, 1:, 1:]], axis=-1
    )  # (n, ch-1, cw-1, 4*bins)
    blocks = blocks / np.sqrt(np.sum(blocks**2, axis=-1, keepdims=True) + 1e-6)
    blocks = np.minimum(blocks, 0.2)
    blocks = blocks / np.sqrt(np.sum(blocks**2, axis=-1, keepdims=True) + 1e-6)
    return blocks.reshape(n, -1)


def pair_cosine(features: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1."""
    norm = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return np.sum(norm[0::2] * norm[1::2], axis=1)


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold (predict same when score > t) with the highest accuracy on these pairs, and that accuracy."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order].astype(np.int64)
    n = len(s)
    # threshold below element i: pairs 0..i-1 predicted different, i..n-1 predicted same
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = neg_below + pos_above
    # only cut between distinct scores
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] != s[:-1]
    correct = np.where(valid, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        t = s[0] - 1e-6 if n else 0.0
    elif i == n:
        t = s[-1] + 1e-6
    else:
        t = (s[i - 1] + s[i]) / 2
    return float(t), float(correct[i] / max(n, 1))


def ten_fold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> float:
    """LFW-style: contiguous folds; the threshold is chosen on the other folds and tested on this one."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    n = len(scores)
    bounds = np.linspace(0, n, folds + 1).astype(int)
    accs = []
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k] : bounds[k + 1]] = True
        if not test.any():
            continue
        t, _ = best_threshold(scores[~test], issame[~test])
        accs.append(np.mean((scores[test] > t) == issame[test]))
    return float(np.mean(accs))


def baselines(pair_set: PairSet, chunk_pairs: int = 256) -> dict[str, float]:
    """Raw-pixel and HOG cosine 10-fold accuracy. HOG is scored both as is and centred on the set's mean
    descriptor; the better of the two is reported, so the limit holds for either reading.

    Images are decoded `chunk_pairs` pairs at a time; only the HOG descriptors (float32) are kept whole,
    because centring needs their mean."""
    issame = np.asarray(pair_set.issame)
    pix_scores, hogs = [], []
    for start in range(0, len(issame), chunk_pairs):
        grey = decode_grey(pair_set.images[2 * start : 2 * (start + chunk_pairs)])
        pix_scores.append(pair_cosine(pixel_features(grey)))
        hogs.append(hog_features(grey).astype(np.float32))
    pix = np.concatenate(pix_scores)
    hog = np.concatenate(hogs)
    hog_plain = ten_fold_accuracy(pair_cosine(hog), issame)
    hog_centred = ten_fold_accuracy(pair_cosine(hog - hog.mean(axis=0)), issame)
    rows = pair_set.rows
    clean = np.array([r["degradation_a"] < CLEAN_MAX and r["degradation_b"] < CLEAN_MAX for r in rows])
    result = {
        "pixel_cosine_acc": ten_fold_accuracy(pix, issame),
        "hog_cosine_acc": max(hog_plain, hog_centred),
        "hog_plain_acc": hog_plain,
        "hog_centred_acc": hog_centred,
    }
    if clean.sum() >= 20:
        # clean pairs only, one best threshold fitted on them (optimistic, no folds): an upper bound
        result["pixel_clean_best_acc"] = best_threshold(pix[clean], issame[clean])[1]
        result["hog_clean_best_acc"] = best_threshold(pair_cosine(hog[np.repeat(clean, 2)]), issame[clean])[1]
    return result
