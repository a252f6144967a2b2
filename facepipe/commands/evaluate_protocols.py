"""The template protocols of `facepipe evaluate`: IJB 1:1 + 1:N (closed/open set) and video set-to-set.

Inputs are features files (NPZ) or a protocol folder (`facepipe.data.protocols` readers, `facepipe synth
--protocols`) embedded with `--model`:
- templates NPZ: ``embeddings`` (N, D), optional ``flipped``, ``faceness``, ``uncertainty``; ``templates``,
  ``medias`` (N,); the 1:1 list ``p1``, ``p2``, ``label``; for 1:N also ``gallery_templates``,
  ``gallery_subjects``, ``gallery_sets`` (one gallery name per row, e.g. G1/G2), ``probe_templates``,
  ``probe_subjects``;
- video NPZ: ``embeddings``, optional ``flipped``, ``uncertainty`` (+ ``kind``, ``method``), ``videos`` (N,)
  the video of each frame, and the pair list ``video_a``, ``video_b``, ``issame``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from facepipe.commands.options import load
from facepipe.errors import DataError, FacepipeError

ONE_TO_N_KEYS = ("gallery_templates", "gallery_subjects", "probe_templates", "probe_subjects")
VIDEO_KEYS = ("embeddings", "videos", "video_a", "video_b", "issame")


def numbers(text: str | None, default: tuple, what: str, cast=float) -> tuple:
    if text is None:
        return default
    try:
        values = tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise FacepipeError(f"{what} must be comma-separated numbers: {text!r}") from err
    if not values:
        raise FacepipeError(f"{what} is empty")
    return values


def wants(args: argparse.Namespace, protocol: str) -> bool:
    """Whether --protocols (default: whatever the data holds) asks for `protocol` (1:1, 1:N, video)."""
    chosen = getattr(args, "protocols", None)
    return chosen is None or protocol in {p.strip().lower() for p in chosen.split(",")}


def run_identification(args: argparse.Namespace, data: dict, path: Path, feats, uniq, out: Path):
    """1:N closed and open set when the templates file holds gallery and probe lists."""
    from facepipe.eval.identification import DEFAULT_FPIR, DEFAULT_RANKS
    from facepipe.eval.protocol_report import evaluate_identification

    missing = [k for k in ONE_TO_N_KEYS if k not in data]
    if missing:
        if getattr(args, "protocols", None) and wants(args, "1:n"):
            raise DataError(f"1:N needs {missing} in the templates file", path=path)
        return None, []
    g_t = np.asarray(data["gallery_templates"]).reshape(-1)
    g_s = np.asarray(data["gallery_subjects"]).reshape(-1)
    sets = np.asarray(data["gallery_sets"]).astype(str) if "gallery_sets" in data else np.full(g_t.shape, "G")
    galleries = {str(g): (g_t[sets == g], g_s[sets == g]) for g in dict.fromkeys(sets.tolist())}
    ranks = numbers(args.ranks, DEFAULT_RANKS, "--ranks", int)
    fpir = numbers(args.fpir, DEFAULT_FPIR, "--fpir")
    try:
        return evaluate_identification(
            feats,
            uniq,
            galleries,
            (data["probe_templates"], data["probe_subjects"]),
            out / "identification",
            f"{args.name or path.stem} 1:N",
            ranks,
            fpir,
        )
    except ValueError as err:
        raise DataError(str(err), path=path) from err


def run_video(args: argparse.Namespace, path: Path, data: dict | None = None):
    """Video set-to-set verification from a video NPZ: metrics.json, roc.png, det.png in --out."""
    from facepipe.eval.protocol_report import evaluate_video

    if data is None:
        from facepipe.npz import load_npz

        if not path.is_file():
            raise DataError("video features file not found", path=path)
        data = load_npz(path, "video features")
    missing = [k for k in VIDEO_KEYS if k not in data]
    if missing:
        raise DataError(f"video features file lacks {missing}", path=path)
    unc = None if args.uncertainty == "none" else data.get("uncertainty")
    kind = str(data["kind"]) if "kind" in data else "sigma_sq"
    if args.uncertainty not in ("auto", "none"):
        kind = args.uncertainty
    method = None if args.fusion == "insightface" else args.fusion
    if method is None and "method" in data and str(data["method"]):
        method = str(data["method"])
    try:
        return evaluate_video(
            data["embeddings"],
            data["videos"],
            data["video_a"],
            data["video_b"],
            data["issame"],
            args.out,
            args.name or path.stem,
            data.get("flipped"),
            unc,
            kind,
            method,
            load(args).eval.folds,
        )
    except ValueError as err:
        raise DataError(str(err), path=path) from err


def embed_protocol(model, folder: Path, batch: int = 256, flip: bool = True) -> tuple[str, dict]:
    """Embed the images of a protocol folder: (kind, the templates or video NPZ arrays)."""
    import pyarrow.parquet as pq

    from facepipe.data.protocols import read_protocol_info
    from facepipe.eval.model_features import embed_batch
    from facepipe.models.embed import decode_images_of

    info = read_protocol_info(folder)
    kind = info.get("kind")
    table_name = {"ijb": "images.parquet", "video": "frames.parquet"}.get(kind)
    if table_name is None:
        raise DataError(
            f"protocol kind {kind!r}: use --shards for pair tables", path=str(folder / "protocol.json")
        )
    path = folder / table_name
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    size, order = tuple(model.info.input_size), model.info.color_order
    parts: dict[str, list] = {}
    for s in range(0, len(images), batch):
        pixels = decode_images_of(images[s : s + batch], size, order, str(path), s)
        for key, value in embed_batch(model, pixels, flip).items():
            parts.setdefault(key, []).append(value)
    data = {k: np.concatenate(v) for k, v in parts.items()}
    if model.method:
        data["kind"], data["method"] = np.array(model.kind), np.array(model.method)
    if kind == "ijb":
        pairs = pq.read_table(folder / "template_pairs.parquet")
        data.update(
            templates=table.column("template").to_numpy(),
            medias=table.column("media").to_numpy(),
            faceness=table.column("faceness").to_numpy().astype(np.float64),
            p1=pairs.column("t1").to_numpy(),
            p2=pairs.column("t2").to_numpy(),
            label=pairs.column("label").to_numpy(),
        )
        if (folder / "gallery.parquet").is_file():
            g, p = pq.read_table(folder / "gallery.parquet"), pq.read_table(folder / "probe.parquet")
            data.update(
                gallery_templates=g.column("template").to_numpy(),
                gallery_subjects=g.column("subject").to_numpy(),
                gallery_sets=np.array(g.column("gallery").to_pylist()),
                probe_templates=p.column("template").to_numpy(),
                probe_subjects=p.column("subject").to_numpy(),
            )
    else:
        pairs = pq.read_table(folder / "video_pairs.parquet")
        data.update(
            videos=table.column("video").to_numpy(),
            video_a=pairs.column("video_a").to_numpy(),
            video_b=pairs.column("video_b").to_numpy(),
            issame=pairs.column("issame").to_numpy(),
        )
    return kind, data
