"""Video set-to-set verification (YouTube-Faces style): each video's frames form one template.

Frames are aggregated per video (mean of L2-normalised frame features by default, or any
``fuse(mu, u)`` callable such as a PFE/ProbFace/SCF fusion), video pairs are scored (cosine or a
``pair_score`` callable), and the pairs are evaluated with the k-fold protocol (thresholds taken
from the scores) plus the ROC/TAR table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facepipe.eval.ijb import Fuse, TemplateVerification, aggregate_with, tar_at_far, template_index
from facepipe.eval.scoring import PairScore, score_pairs
from facepipe.eval.verification import KFoldResult, kfold_accuracy_scores, l2_normalize


def mean_of_unit_frames(mu: np.ndarray, unc: np.ndarray | None) -> tuple[np.ndarray, None]:
    """Default video fusion: average the L2-normalised frames, then normalise again."""
    m = l2_normalize(mu).mean(axis=0, keepdims=True)
    return l2_normalize(m)[0], None


@dataclass
class VideoResult:
    kfold: KFoldResult
    roc: TemplateVerification

    def metrics(self) -> dict:
        return {
            "accuracy": self.kfold.accuracy,
            "std": self.kfold.std,
            "fold_accuracy": self.kfold.fold_accuracy.tolist(),
            **self.roc.metrics(),
        }


def verify_videos(
    frame_feats: np.ndarray,
    frame_video: np.ndarray,
    video_a: np.ndarray,
    video_b: np.ndarray,
    issame: np.ndarray,
    frame_unc: np.ndarray | None = None,
    fuse: Fuse | None = None,
    metric: str | PairScore = "cosine",
    n_folds: int = 10,
) -> VideoResult:
    """Set-to-set verification of video pairs given per-frame features and each frame's video id."""
    mu_t, unc_t, videos = aggregate_with(frame_feats, frame_unc, frame_video, fuse or mean_of_unit_frames)
    ia = template_index(videos, video_a, "video_a")
    ib = template_index(videos, video_b, "video_b")
    scores = score_pairs(mu_t, ia, ib, metric, unc_t)
    issame = np.asarray(issame, dtype=bool)
    return VideoResult(kfold_accuracy_scores(scores, issame, True, n_folds), tar_at_far(scores, issame))
