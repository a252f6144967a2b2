"""How hard is the generated sample dataset? Prints one JSON object.

Always: raw-pixel and HOG cosine 10-fold accuracy on each verification set (the limits are 0.70 and 0.80).
With --train: a learnability check. A small CNN (GDC-pooled, ~0.4M parameters, CosFace-style normalised
softmax head written inline) trains on the generated training identities on CPU for a budget of samples
(and at most --minutes of wall time), then is scored 10-fold on the verification pairs: overall, on clean
pairs (both degradation < 0.3) and on degraded pairs (either > 0.7). The ratio to compare is the CNN's
accuracy against the pixel/HOG baselines measured in the same run.

    .venv/bin/python bench/synth_difficulty.py --identities 500 --pairs 1200 --train --samples 60000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from facepipe.data.synth import baselines as SB
from facepipe.data.synth import generate as S


def _decode_colour(images: list[bytes], side: int) -> np.ndarray:
    import cv2

    out = np.empty((len(images), side, side, 3), dtype=np.uint8)
    for i, b in enumerate(images):
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        out[i] = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    return out


def _load_written(folder: str, set_names: list[str]) -> tuple[list[bytes], np.ndarray, list[S.PairSet]]:
    """Training images/labels and pair sets from a folder `facepipe synth` wrote (read, not re-rendered)."""
    import pyarrow.parquet as pq

    from facepipe.data.formats.insightface import open_training_set
    from facepipe.data.formats.recordio import IndexedRecordFile, header_label, unpack
    from facepipe.data.formats.verification_bin import load_bin

    ts = open_training_set(folder)
    images, labels = [], []
    with IndexedRecordFile(ts.rec_path, ts.idx_path) as rec:
        for key in ts.image_keys:
            header, payload = unpack(rec.read(int(key)))
            images.append(payload)
            labels.append(int(header_label(header)))
    sets = []
    for name in set_names:
        if not os.path.exists(os.path.join(folder, f"{name}.bin")):
            continue
        pair_images, issame = load_bin(os.path.join(folder, f"{name}.bin"))
        rows = pq.read_table(os.path.join(folder, f"{name}.degradation.parquet")).to_pylist()
        sets.append(S.PairSet(name, pair_images, issame, rows))
    return images, np.asarray(labels, dtype=np.int64), sets


def _subset_accuracy(scores: np.ndarray, issame: np.ndarray, mask: np.ndarray) -> float | None:
    if mask.sum() < 40:
        return None
    return SB.ten_fold_accuracy(scores[mask], issame[mask])


def _build_model(width: int = 32, emb: int = 128):
    import torch.nn as nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
        )  # fmt: skip

    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.PReLU(w),  # 56
        block(w, 2 * w, 2),  # 28
        block(2 * w, 4 * w, 2),  # 14
        block(4 * w, 6 * w, 2),  # 7
        # global depthwise conv: keeps where a feature is, which average pooling throws away
        nn.Conv2d(6 * w, 6 * w, 7, 1, 0, groups=6 * w, bias=False), nn.BatchNorm2d(6 * w),
        nn.Flatten(), nn.Linear(6 * w, emb, bias=False), nn.BatchNorm1d(emb),
    )  # fmt: skip


def _embed(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            t = _to_tensor(x[i : i + batch])
            e = model(t) + model(torch.flip(t, dims=[3]))  # flip test-time augmentation
            out.append(torch.nn.functional.normalize(e, dim=1).numpy())
    model.train()
    return np.concatenate(out)


def _to_tensor(x: np.ndarray):
    import torch

    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.5) / 128.0


def train_and_score(
    train_x: np.ndarray,
    train_y: np.ndarray,
    pair_sets: list[tuple[S.PairSet, np.ndarray]],
    samples: int,
    max_minutes: float,
    threads: int,
    seed: int,
    width: int = 16,
) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = int(train_y.max()) + 1
    model = _build_model(width)
    weight = torch.nn.Parameter(torch.randn(classes, 128) * 0.01)
    params = list(model.parameters()) + [weight]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=5e-4)
    batch = 128
    steps = max(1, samples // batch)
    warm = max(1, steps // 20)
    scale, margin = 30.0, 0.3  # CosFace: logits s * (cos - m) for the true class
    start = time.monotonic()
    losses = []
    done = 0
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, len(train_x), batch)
        xb = train_x[idx]
        flip = rng.random(batch) < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
        x = _to_tensor(np.ascontiguousarray(xb))
        y = torch.from_numpy(train_y[idx])
        emb = F.normalize(model(x), dim=1)
        cos = emb @ F.normalize(weight, dim=1).T
        logits = scale * (cos - margin * F.one_hot(y, classes))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if step % 50 == 0:
            print(
                f"step {step}/{steps} loss {losses[-1]:.3f} {time.monotonic() - start:.0f}s", file=sys.stderr
            )
        if time.monotonic() - start > max_minutes * 60:
            break
    train_s = time.monotonic() - start
    result = {
        "train_seconds": round(train_s, 1),
        "steps": done,
        "planned_steps": steps,
        "samples_seen": done * batch,
        "images_s": round(done * batch / train_s, 1),
        "loss_first": round(float(np.mean(losses[:20])), 3),
        "loss_last": round(float(np.mean(losses[-20:])), 3),
        "params": sum(p.numel() for p in model.parameters()),
    }
    for pair_set, images in pair_sets:
        emb = _embed(model, images)
        scores = np.sum(emb[0::2] * emb[1::2], axis=1)
        issame = np.asarray(pair_set.issame)
        da = np.array([r["degradation_a"] for r in pair_set.rows])
        db = np.array([r["degradation_b"] for r in pair_set.rows])
        hard = np.array([r["hard_negative"] for r in pair_set.rows])
        clean = (da < S.CLEAN_MAX) & (db < S.CLEAN_MAX)
        degraded = (da > S.DEGRADED_MIN) | (db > S.DEGRADED_MIN)
        thr, _ = SB.best_threshold(scores, issame)
        result[pair_set.name] = {
            "cnn_acc": SB.ten_fold_accuracy(scores, issame),
            "cnn_clean_acc": _subset_accuracy(scores, issame, clean),
            "cnn_degraded_acc": _subset_accuracy(scores, issame, degraded),
            "clean_pairs": int(clean.sum()),
            "degraded_pairs": int(degraded.sum()),
            # at the single best global threshold: how often relatives are called the same person
            "hard_negative_false_accept": float(np.mean(scores[hard] > thr)) if hard.any() else None,
            "random_negative_false_accept": float(np.mean(scores[~issame & ~hard] > thr)),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--images-per-identity", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also run the small-CNN learnability check")
    parser.add_argument("--input", type=int, default=56, help="CNN input side")
    parser.add_argument("--samples", type=int, default=60000, help="training samples (batches of 128)")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-time cap for training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=16, help="CNN base width (channels of the first layer)")
    parser.add_argument("--data", help="read a folder written by `facepipe synth` instead of rendering")
    args = parser.parse_args(argv)

    cfg = S.SynthConfig(
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        pairs=args.pairs,
        seed=args.seed,
    )
    result: dict = {"config": dict(vars(args)), "baselines": {}}
    t0 = time.monotonic()
    if args.data:
        images, train_y, sets = _load_written(args.data, [spec.name for spec in cfg.pair_sets])
    else:
        sets = [S.build_pair_set(cfg, i, args.workers) for i in range(len(cfg.pair_sets))]
    for ps in sets:
        result["baselines"][ps.name] = S.baselines(ps)
    result["prepare_seconds"] = round(time.monotonic() - t0, 1)
    if args.train:
        t1 = time.monotonic()
        if not args.data:
            images, labels = [], []
            for label, items in S.iter_training_classes(cfg, args.workers):
                images.extend(jpeg for jpeg, _ in items)
                labels.extend([label] * len(items))
            train_y = np.asarray(labels, dtype=np.int64)
        train_x = _decode_colour(images, args.input)
        pair_data = [(ps, _decode_colour(ps.images, args.input)) for ps in sets]
        result["render_decode_train_seconds"] = round(time.monotonic() - t1, 1)
        result["cnn"] = train_and_score(
            train_x, train_y, pair_data, args.samples, args.minutes, args.threads, args.seed, args.width
        )
    result["load_average_1m"] = os.getloadavg()[0]
    json.dump(result, sys.stdout, indent=1, default=float)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
