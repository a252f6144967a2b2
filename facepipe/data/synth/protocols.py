"""Generated template and video protocols, written in the release layouts the readers take.

- `write_ijb_layout`: an IJB-C-layout set (`loose_crop/`, `meta/ijbc_*`): per subject one gallery
  template (in G1 for even subjects, G2 for odd) and two probe templates, each template of 1-3 media
  with 1-3 frames, and the template's quality drawn clean, mixed or degraded; a 1:1 list of genuine
  and impostor template pairs; held-out (verification) identities, never training ones.
- `write_ytf_layout`: a YTF-layout set (`frames/<Name>/<v>/<i>.jpg`, `splits.txt`, `landmarks.txt`):
  two short videos per identity whose degradation moves linearly from one level to another along the
  sequence, and matched / mismatched video pairs in 10 splits.
Images are drawn already aligned, so the 5 points written are the alignment template's (the aligner
then keeps each image as drawn). `write_protocols` writes both and reads them back into
OUT/protocols/{ijb,video} with the readers of `facepipe.data.protocols`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facepipe.data.align.geometry import get_template
from facepipe.data.synth import render as sr
from facepipe.data.synth.generate import SynthConfig, verification_identity
from facepipe.fsutil import atomic_path

_S_IJB, _S_VIDEO = 9101, 9102  # stream salts, apart from generate.py's
QUALITY = {"clean": (0.0, 0.3), "mixed": (0.0, 1.0), "degraded": (0.6, 1.0)}


def _points(size: int) -> np.ndarray:
    return get_template("arcface").array * (size / 112.0)


def _write_text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        Path(tmp).write_bytes(data)


def write_ijb_layout(out: str | os.PathLike, cfg: SynthConfig, subjects: int = 20) -> dict:
    """Render the IJB-C-layout set into OUT; returns counts."""
    out = Path(out)
    pts = " ".join(f"{v:.2f}" for v in _points(cfg.size).ravel())
    face, lmk, g_rows, p_rows = [], [], {"G1": [], "G2": []}, []
    templates: list[tuple[int, int]] = []  # (template id, subject)
    image, media = 0, 0
    for s in range(subjects):
        ident = verification_identity(cfg, 100_000 + s)
        rng = np.random.default_rng([cfg.seed, _S_IJB, s])
        for role in ("gallery", "probe", "probe"):
            tid = len(templates) + 1
            templates.append((tid, s))
            quality = QUALITY["clean"] if role == "gallery" else QUALITY[str(rng.choice(list(QUALITY)))]
            for _ in range(int(rng.integers(1, 4))):
                media += 1
                for _ in range(int(rng.integers(1, 4))):
                    image += 1
                    d = float(rng.uniform(*quality))
                    name = f"{image}.jpg"
                    _write_bytes(
                        out / "loose_crop" / name, sr.render(ident, sr.sample_nuisance(rng, d), cfg.size)
                    )
                    face.append(f"{name} {tid} {media}")
                    lmk.append(
                        f"{name} {pts} {1.0 - 0.5 * d:.4f}"
                    )  # the detector is less sure of worse faces
                    row = f"{tid},{s},img/{name}"
                    (g_rows["G1" if s % 2 == 0 else "G2"] if role == "gallery" else p_rows).append(row)
    rng = np.random.default_rng([cfg.seed, _S_IJB, 1 << 30])
    pairs = []
    by_subject: dict[int, list[int]] = {}
    for tid, s in templates:
        by_subject.setdefault(s, []).append(tid)
    for s, tids in by_subject.items():
        pairs += [f"{a} {b} 1" for i, a in enumerate(tids) for b in tids[i + 1 :]]
        for _ in range(len(tids)):  # impostors: as many as genuine pairs per subject
            other = int((s + 1 + rng.integers(subjects - 1)) % subjects)
            pairs.append(f"{tids[int(rng.integers(len(tids)))]} {by_subject[other][int(rng.integers(3))]} 0")
    meta = out / "meta"
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    _write_text(meta / "ijbc_face_tid_mid.txt", face)
    _write_text(meta / "ijbc_name_5pts_score.txt", lmk)
    _write_text(meta / "ijbc_template_pair_label.txt", pairs)
    for g, rows in g_rows.items():
        _write_text(meta / f"ijbc_1N_gallery_{g}.csv", [header, *rows])
    _write_text(meta / "ijbc_1N_probe_mixed.csv", [header, *p_rows])
    return {
        "subjects": subjects,
        "templates": len(templates),
        "images": image,
        "medias": media,
        "pairs": len(pairs),
    }


def write_ytf_layout(
    out: str | os.PathLike, cfg: SynthConfig, identities: int = 20, frames: int = 8, videos: int = 2
) -> dict:
    """Render the YTF-layout set into OUT; returns counts."""
    out = Path(out)
    pts = " ".join(f"{v:.2f}" for v in _points(cfg.size).ravel())
    marks, names = [], [f"Synth_{i:04d}" for i in range(identities)]
    for i, name in enumerate(names):
        ident = verification_identity(cfg, 200_000 + i)
        for v in range(videos):
            rng = np.random.default_rng([cfg.seed, _S_VIDEO, i, v])
            d0, d1 = rng.uniform(0.0, 1.0, 2)  # degradation drifts from d0 to d1 along the sequence
            for f in range(frames):
                d = float(d0 + (d1 - d0) * f / max(frames - 1, 1))
                rel = f"{name}/{v}/{v}.{f}.jpg"
                _write_bytes(out / "frames" / rel, sr.render(ident, sr.sample_nuisance(rng, d), cfg.size))
                marks.append(f"{rel} {pts}")
    rng = np.random.default_rng([cfg.seed, _S_VIDEO, 1 << 30])
    rows = []
    for i, name in enumerate(names):
        rows.append((f"{name}/0", f"{name}/1", 1))
        j = int((i + 1 + rng.integers(identities - 1)) % identities)
        rows.append((f"{name}/{int(rng.integers(videos))}", f"{names[j]}/{int(rng.integers(videos))}", 0))
    per_split = max(1, len(rows) // 10)
    lines = ["split number, first name, second name, match, is same"]
    lines += [
        f"{min(10, k // per_split + 1)}, {a}, {b}, {same}, {same}" for k, (a, b, same) in enumerate(rows)
    ]
    _write_text(out / "splits.txt", lines)
    _write_text(out / "landmarks.txt", marks)
    return {"identities": identities, "videos": identities * videos, "frames": len(marks), "pairs": len(rows)}


def write_protocols(
    out: str | os.PathLike, cfg: SynthConfig, kinds: tuple[str, ...] = ("ijb", "video"), subjects: int = 20
) -> dict:
    """Write the release layouts under OUT/ijb and OUT/ytf, read them into OUT/protocols/{ijb,video}."""
    from facepipe.data.protocols.ijb import read_ijb
    from facepipe.data.protocols.ytf import read_ytf

    out = Path(out)
    info: dict = {}
    if "ijb" in kinds:
        info["ijb"] = write_ijb_layout(out / "ijb", cfg, subjects)
        info["ijb"]["tables"] = str(out / "protocols" / "ijb")
        read_ijb(out / "ijb", out / "protocols" / "ijb")
    if "video" in kinds:
        info["video"] = write_ytf_layout(out / "ytf", cfg, subjects)
        info["video"]["tables"] = str(out / "protocols" / "video")
        read_ytf(
            out / "ytf" / "frames",
            out / "ytf" / "splits.txt",
            out / "protocols" / "video",
            out / "ytf" / "landmarks.txt",
        )
    return info
