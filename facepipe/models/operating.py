"""The operating point a registered version carries: score thresholds at stated FARs, an uncertainty cut.

Measured on the validation pair tables when a version is registered and stored as model-version tags
(`threshold.far.1e-3`, `risk_threshold.reject.1e-1`, `threshold.score`, ...), or as
`operating_point.json` beside a local model folder. `facepipe verify` and the pyfunc read it back:

- a pair is "same" when its score is *above* the threshold of the chosen FAR. The threshold is the
  (k+1)-th largest impostor score with k = floor(FAR · impostors), so at most a FAR fraction of the
  validation impostors score above it (with fewer than 1/FAR impostors that is none of them, and the
  stored `threshold.n_impostors` says how coarse the estimate is);
- a pair is rejected as uncertain when either image's uncertainty (larger = less reliable) is above
  the `reject` quantile's cut: the fraction `reject` of validation images lies above it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from facepipe import storage
from facepipe.errors import FacepipeError
from facepipe.fsutil import write_json_atomic

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
DEFAULT_FAR = 1e-3
DEFAULT_REJECT = 0.1
FAR_TAG = "threshold.far."  # MLflow tag keys allow no "@" or "="
RISK_TAG = "risk_threshold.reject."
SCORE_TAG = "threshold.score"
COUNT_TAGS = ("threshold.n_impostors", "threshold.n_genuine")
POINT_FILE = "operating_point.json"
log = logging.getLogger(__name__)
MAX_PAIRS = 6000  # in all, shared by the tables (LFW's size): registration stays cheap beside training

SAME, DIFFERENT, REJECTED = "same", "different", "rejected"


def rate_key(rate: float) -> str:
    """A rate as tags spell it: 0.001 -> '1e-3', 0.1 -> '1e-1', 0.05 -> '5e-2'."""
    mantissa, _, exponent = f"{float(rate):.0e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The score above which at most `far` of `impostor_scores` lie (see the module notes)."""
    scores = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise FacepipeError("no impostor pairs to set a threshold from")
    k = min(int(math.floor(far * scores.size)), scores.size - 1)
    return float(scores[k])


def operating_point(
    scores: np.ndarray,
    issame: np.ndarray,
    image_uncertainty: np.ndarray | None,
    score_name: str,
    fars: tuple[float, ...] = DEFAULT_FARS,
    reject: float = DEFAULT_REJECT,
) -> dict[str, str]:
    """Tags of the operating point from pair scores, labels and per-image uncertainty (NaN: none)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    impostors = scores[~issame]
    tags = {SCORE_TAG: score_name, COUNT_TAGS[0]: str(impostors.size), COUNT_TAGS[1]: str(int(issame.sum()))}
    for far in fars:
        tags[FAR_TAG + rate_key(far)] = repr(threshold_at_far(impostors, far))
    if image_uncertainty is not None:
        u = np.asarray(image_uncertainty, dtype=np.float64)
        u = u[np.isfinite(u)]
        if u.size:
            tags[RISK_TAG + rate_key(reject)] = repr(float(np.quantile(u, 1.0 - reject)))
    return tags


def pick(tags: dict[str, str], far: float, reject: float | None = None) -> tuple[float, float | None]:
    """(score threshold at `far`, uncertainty cut at `reject` or None) from stored tags."""
    key = FAR_TAG + rate_key(far)
    if key not in tags:
        stored = sorted(k[len(FAR_TAG) :] for k in tags if k.startswith(FAR_TAG))
        have = f"stored: FAR {', '.join(stored)}" if stored else "none is stored with this model"
        raise FacepipeError(f"no threshold for FAR {rate_key(far)} ({have}); pass --threshold")
    risks = {k[len(RISK_TAG) :]: float(v) for k, v in tags.items() if k.startswith(RISK_TAG)}
    if reject is not None:
        risk = risks.get(rate_key(reject))
    else:  # the one stored (registration stores one)
        risk = next(iter(sorted(risks.items())), (None, None))[1]
    return float(tags[key]), risk


def decide(score: float, unc_a: float, unc_b: float, threshold: float, risk: float | None) -> str:
    """same / different at `threshold`, or rejected when either uncertainty is past `risk`."""
    known = [u for u in (unc_a, unc_b) if math.isfinite(u)]  # NaN: the model has no uncertainty head
    if risk is not None and known and max(known) > risk:
        return REJECTED
    return SAME if score > threshold else DIFFERENT


def write_point_file(folder: str | os.PathLike, tags: dict[str, str]) -> Path:
    path = Path(folder) / POINT_FILE
    write_json_atomic(path, tags)
    return path


def read_point_file(folder: str | os.PathLike) -> dict[str, str]:
    """The tags in `folder/operating_point.json`, or {} when there is none."""
    path = Path(folder) / POINT_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FacepipeError(f"cannot read operating point {path}: {err}") from None
    return {str(k): str(v) for k, v in data.items()}


def pair_tables_point(
    model: Any,
    tables: list[Path] | list[str],
    fars: tuple[float, ...] = DEFAULT_FARS,
    reject: float = DEFAULT_REJECT,
    max_pairs: int = MAX_PAIRS,
) -> dict[str, str] | None:
    """The operating point of `model` (a `FaceModel`) on pair tables of aligned crops; None without any."""
    import pyarrow.parquet as pq

    from facepipe.models.embed import decode_images_of

    scores, same, unc = [], [], []
    per_table = max(1, max_pairs // max(1, len(tables)))  # each table gets its share of the budget
    for path in tables:
        # a dataset on object storage (s3://...) is read in place, like the evaluation reads it
        handle = pq.ParquetFile(storage.open_input_file(path) if storage.is_remote(path) else path)
        row = 0
        for batch in handle.iter_batches(batch_size=128, columns=["image_a", "image_b", "issame"]):
            if row >= per_table:
                break
            a, b = batch.column("image_a").to_pylist(), batch.column("image_b").to_pylist()
            imgs = [img for pair in zip(a, b, strict=True) for img in pair]
            order = model.info.color_order
            out = model.embed(decode_images_of(imgs, model.input_size, order, str(path), 2 * row))
            u = out["u"]
            scores.append(
                model.score(
                    out["embedding"][0::2],
                    None if u is None else u[0::2],
                    out["embedding"][1::2],
                    None if u is None else u[1::2],
                )
            )
            same.append(batch.column("issame").to_numpy(zero_copy_only=False).astype(bool))
            unc.append(out["uncertainty"])
            row += batch.num_rows
    if not scores:
        return None
    labels = np.concatenate(same)
    if labels.all():
        return None  # no impostor pair: no threshold
    uncertainty = None if model.method is None else np.concatenate(unc)
    return operating_point(np.concatenate(scores), labels, uncertainty, model.score_name, fars, reject)


def point_tags(tags: dict[str, str]) -> dict[str, str]:
    """The operating-point entries among a model version's tags."""
    keys = (FAR_TAG, RISK_TAG, SCORE_TAG, *COUNT_TAGS)
    return {k: v for k, v in tags.items() if k.startswith(keys)}


def version_point_tags(mlc: Any, uri: str) -> dict[str, str]:
    """The operating-point tags of the model version `uri` names (an MLflow client reads them)."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        return {}  # a run's model is no registered version: no tags
    name, _, alias = uri[len("models:/") :].strip("/").partition("@")
    try:
        if alias:
            version = mlc.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.rpartition("/")
            version = mlc.get_model_version(name, number)
    except MlflowException as err:
        raise FacepipeError(f"cannot read model {uri}: {err.message}") from err
    return point_tags(version.tags)


def registration_point(
    bundle_dir: str | os.PathLike, head_dir: str | os.PathLike | None, shards_dir: str | None
) -> dict[str, str]:
    """The operating point of a model being registered, on its run's pair tables ({} without any)."""
    from facepipe.data.shards import pair_tables
    from facepipe.models.photo import FaceModel

    tables = list(pair_tables(shards_dir).values()) if shards_dir else []
    if not tables:
        return {}
    try:
        return pair_tables_point(FaceModel(bundle_dir, head_dir), tables) or {}
    except FacepipeError as err:  # the model is registered either way; verify then needs --threshold
        log.warning("no operating point stored for %s: %s", bundle_dir, err)
        return {}
