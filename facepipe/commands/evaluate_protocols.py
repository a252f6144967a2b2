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
from typing import Any

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


def run_templates(args: argparse.Namespace, data: dict | None = None) -> tuple[dict, list[Path]]:
    """An IJB-style templates file (or its arrays, `data`): 1:1 and, with gallery and probe lists, 1:N
    (as --protocols asks) into --out; returns (metrics, files written)."""
    from facepipe.eval.ijb import aggregate_insightface, verify_templates
    from facepipe.eval.report import plot_det, plot_roc, write_metrics
    from facepipe.npz import load_npz

    path = args.templates
    if data is None:
        if not path.is_file():
            raise DataError("templates file not found", path=path)
        data = load_npz(path, "templates")  # names the file on a truncated or non-zip .npz
    missing = [k for k in ("embeddings", "templates", "medias", "p1", "p2", "label") if k not in data]
    if missing:
        raise DataError(f"templates file lacks {missing}", path=path)
    try:
        if args.fusion == "insightface":
            feats, uniq = aggregate_insightface(
                data["embeddings"],
                data["templates"],
                data["medias"],
                data.get("flipped"),
                data.get("faceness"),
            )
            res = verify_templates(feats, uniq, data["p1"], data["p2"], data["label"])
        else:
            res, uniq = fused_templates(args.fusion, data, path)
    except ValueError as err:
        raise DataError(str(err), path=path) from err
    name = args.name or path.stem
    metrics = {"name": name, "fusion": args.fusion, "n_templates": int(uniq.shape[0])}
    out = Path(args.out)
    label = (
        "cosine (InsightFace templates)" if args.fusion == "insightface" else f"{args.fusion} fusion + score"
    )
    paths = []
    if wants(args, "1:1"):
        metrics |= res.metrics()
        paths += [
            plot_roc({label: (res.fpr, res.tpr)}, out / "roc.png", f"{name}: template ROC"),
            plot_det({label: (res.fpr, res.tpr)}, out / "det.png", f"{name}: template DET"),
        ]
    if wants(args, "1:n") and args.fusion == "insightface":
        feats, uniq = aggregate_insightface(
            data["embeddings"], data["templates"], data["medias"], data.get("flipped"), data.get("faceness")
        )
        ident, ident_paths = run_identification(args, data, path, feats, uniq, out)
        if ident is not None:
            metrics["identification"] = ident
            paths += ident_paths
    paths.insert(0, write_metrics(out, metrics))
    return metrics, paths


def fused_templates(method: str, data: dict, path: Path) -> tuple[Any, np.ndarray]:
    """Templates fused by an uncertainty method's own ``fuse`` and scored by its ``pair_score``."""
    import numpy as np

    from facepipe.eval.ijb import aggregate_with, verify_templates
    from facepipe.eval.scoring import numpy_callable
    from facepipe.eval.verification import l2_normalize
    from facepipe.uncertainty.registry import get_method

    spec = get_method(method)
    if "uncertainty" not in data:
        raise DataError(
            f"--fusion {method} needs an 'uncertainty' array ({spec.uncertainty_kind})", path=path
        )
    emb = data["embeddings"] if data.get("flipped") is None else data["embeddings"] + data["flipped"]
    mu = l2_normalize(emb)
    unc = np.asarray(data["uncertainty"], dtype=np.float64).reshape(mu.shape[0], -1)
    unc = spec.to_stored(unc)  # the file stores e.g. 1/κ; the method fuses and scores its own u (κ)
    mu_t, unc_t, uniq = aggregate_with(mu, unc, data["templates"], numpy_callable(spec.fuse))
    res = verify_templates(
        mu_t, uniq, data["p1"], data["p2"], data["label"], numpy_callable(spec.pair_score), unc_t
    )
    return res, uniq


def file_label(path: Path, out: Path) -> str:
    """A written file's name in the summary: its path under --out (identification/metrics.json, ...)."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return Path(path).name


def embed_protocol(model, folder: Path, batch: int = 256, flip: bool = True, cache=None) -> tuple[str, dict]:
    """Embed the images of a protocol folder: (kind, the templates or video NPZ arrays). `cache`: an
    :class:`facepipe.eval.embed_cache.EmbeddingCache` for the backbone's outputs, or None."""
    import pyarrow.parquet as pq

    from facepipe.data.protocols import read_protocol_info
    from facepipe.eval.model_features import embed_table_images
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
    spans = range(0, len(images), batch)
    batches = (decode_images_of(images[s : s + batch], size, order, str(path), s) for s in spans)
    data = embed_table_images(model, batches, path, order, flip, batch, cache)
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


def protocol_report(
    args: argparse.Namespace, model, folder: Path, out: Path, ev, cache=None
) -> tuple[dict, list[Path]]:
    """`--model --protocol`: embed the folder's images with `model`, keep them as OUT/features.npz, then
    the IJB (1:1 + 1:N) or video report into `out`; prints its summary. Returns (metrics, files)."""
    import argparse as ap

    from facepipe.fsutil import atomic_path
    from facepipe.progress import summary

    kind, data = embed_protocol(model, folder, ev.batch_size, ev.flip, cache)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "features.npz") as tmp_path, open(tmp_path, "wb") as fh:
        np.savez(fh, **data)
    # this protocol's own view of the options: its report folder, its name, its data
    sub = ap.Namespace(**{**vars(args), "out": out, "name": args.name or folder.name, "templates": folder})
    metrics, paths = run_video(sub, folder, data) if kind == "video" else run_templates(sub, data)
    lines = {"model": args.model, "protocol": f"{kind} ({folder})", "report": str(out / "metrics.json")}
    print(
        summary(
            f"facepipe evaluate: {args.model} on {folder}",
            lines | {file_label(p, out): str(p) for p in paths},
        )
    )
    return metrics, paths
