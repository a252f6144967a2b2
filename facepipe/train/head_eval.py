"""The head stage's end-of-stage evaluation: the same evaluation as `facepipe evaluate --model`.

The trained head and its frozen backbone are scored by :func:`facepipe.eval.model_features.evaluate_model`
with the run's `eval.*` settings, so a training run's metrics and a later `facepipe evaluate` of the
registered model are the same numbers under the same keys (:mod:`facepipe.eval.metrics`): each pair
table's headline as `val/<table>/<key>`, and each key's mean over the tables at the top level; among them
the champion metric of uncertainty heads, `edc_pauc`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from facepipe.config import EvalConfig
from facepipe.data.dataset import Dataset
from facepipe.eval.metrics import stage_metrics
from facepipe.eval.model_features import EvalModel, evaluate_model
from facepipe.eval.pairs import eval_options
from facepipe.models.bundle import BundleInfo
from facepipe.storage import is_remote


def evaluate_head(
    model: tuple[Any, BundleInfo],
    head: Any,
    method: str,
    shards_dir: str | os.PathLike,
    settings: EvalConfig,
    out_dir: str | os.PathLike,
) -> dict[str, float]:
    """Score the backbone `model` (module, bundle info) with `head` (of uncertainty method `method`) on
    every pair table of `shards_dir`; the report lands in `out_dir`. Returns the run's metrics."""
    backbone, info = model
    head.eval()
    eval_model = EvalModel(backbone, info, head, method, source=f"{method} head (training run)")
    with tempfile.TemporaryDirectory(prefix="facepipe-head-eval-") as tmp:
        local = Dataset.at(shards_dir).fetch_pairs(tmp).location if is_remote(shards_dir) else shards_dir
        summary, _ = evaluate_model(eval_model, local, Path(out_dir), **eval_options(settings))
    return stage_metrics(summary)
