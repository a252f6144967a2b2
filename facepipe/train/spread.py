"""How compact each class is under a backbone: what the fine-tuning stage's centre term is there to change.

On a sample of training images (the first `classes` identities, `per_class` images each), each image's
unit embedding is compared with its class's mean direction: the intra-class spread is the mean of
1 − cos(embedding, class mean), per class and overall; the inter-class cosine is the mean cosine between
different classes' mean directions. The fine-tune report puts the numbers before and after side by side
(metrics `centre/...` and `plots/centre_spread.png`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.models.embed import decode_images_of, embed_images, eval_mode

__all__ = ["class_spread", "plot_spread", "spread_metrics"]


def _sample(
    shards_dir: str | os.PathLike, classes: int, per_class: int
) -> tuple[list[bytes], np.ndarray, str]:
    """Up to `per_class` images of each of the first `classes` identities with at least two images."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    root = str(shards_dir)
    fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    files = sorted(
        i.path for i in fs.get_file_info(pafs.FileSelector(f"{base}/train")) if i.path.endswith(".parquet")
    )
    taken: dict[int, list[bytes]] = {}
    for path in files:
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=512, columns=["label", "image"]):
                for label, image in zip(
                    batch.column("label").to_pylist(), batch.column("image").to_pylist(), strict=True
                ):
                    if label not in taken and len(taken) >= classes:
                        continue
                    images = taken.setdefault(label, [])
                    if len(images) < per_class:
                        images.append(image)
                if len(taken) >= classes and all(len(v) >= per_class for v in taken.values()):
                    break
    kept = {label: imgs for label, imgs in taken.items() if len(imgs) >= 2}
    images = [img for imgs in kept.values() for img in imgs]
    labels = np.array([label for label, imgs in kept.items() for _ in imgs], dtype=np.int64)
    return images, labels, files[0] if files else root


def class_spread(
    # the backbone and how it takes its images (size, colour order)
    backbone: Any, shards_dir: str | os.PathLike, input_size: tuple[int, int], color_order: str,
    classes: int = 64,
    per_class: int = 8,
    batch: int = 128,
) -> dict[str, Any]:
    """{intra_spread, inter_cosine, per_class (spread of each class), classes, images} of `backbone`."""
    images, labels, source = _sample(shards_dir, classes, per_class)
    if len(set(labels.tolist())) < 2:
        return {
            "intra_spread": None,
            "inter_cosine": None,
            "per_class": np.zeros(0),
            "classes": 0,
            "images": 0,
        }
    with eval_mode(backbone):
        parts = [
            embed_images(
                backbone, decode_images_of(images[i : i + batch], input_size, color_order, source, i)
            )[0]
            for i in range(0, len(images), batch)
        ]
    emb = np.concatenate(parts).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.unique(labels)
    means = np.stack([emb[labels == c].mean(axis=0) for c in ids])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    per_class_spread = np.array([np.mean(1.0 - emb[labels == c] @ means[k]) for k, c in enumerate(ids)])
    between = means @ means.T
    off_diagonal = between[~np.eye(len(ids), dtype=bool)]
    return {
        "intra_spread": float(per_class_spread.mean()),
        "inter_cosine": float(off_diagonal.mean()),
        "per_class": per_class_spread,
        "classes": len(ids),
        "images": len(labels),
    }


def spread_metrics(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """`centre/intra_spread_{before,after}`, `centre/inter_cosine_{before,after}` and the spread's ratio."""
    out: dict[str, float] = {}
    for when, spread in (("before", before), ("after", after)):
        for key in ("intra_spread", "inter_cosine"):
            if spread[key] is not None:
                out[f"centre/{key}_{when}"] = float(spread[key])
    if before["intra_spread"] and after["intra_spread"] is not None:
        out["centre/intra_spread_ratio"] = float(after["intra_spread"] / before["intra_spread"])
    return out


def plot_spread(before: dict[str, Any], after: dict[str, Any], path: str | os.PathLike) -> Path:
    """Histogram of the per-class spread before and after fine-tuning (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = [s["per_class"] for s in (before, after) if len(s["per_class"])]
    bins = np.linspace(0.0, max(float(np.max(np.concatenate(values))), 1e-6) * 1.05, 30) if values else 10
    for spread, label, colour in ((before, "before fine-tuning", "tab:grey"), (after, "after", "tab:blue")):
        if len(spread["per_class"]):
            ax.hist(spread["per_class"], bins=bins, alpha=0.6, color=colour,
                    label=f"{label}: mean {spread['intra_spread']:.4f}")  # fmt: skip
    ax.set_xlabel("intra-class spread: mean 1 − cos(embedding, class mean)")
    ax.set_ylabel("classes")
    ax.set_title(f"Centre term: class compactness ({after['classes']} classes, {after['images']} images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
