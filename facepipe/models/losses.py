"""Losses shared by the margin heads and PartialFC, and the non-finite-loss guard.

:func:`dist_cross_entropy` is InsightFace's partial-FC cross-entropy: softmax statistics (max, sum of
exponentials, target probability) are all-reduced across the workers that each hold a shard of the
classes; the target probability is clamped at 1e-30 before the log (so one row's loss is at most
69.08), exactly like the reference. Without an initialised process group (or with ``group=None`` and
world size 1) it is the same computation on one worker.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facepipe.errors import NonFiniteLossError

__all__ = ["check_finite", "dist_cross_entropy", "cross_entropy", "all_reduce_sum", "TARGET_PROB_FLOOR"]

TARGET_PROB_FLOOR = 1e-30


def check_finite(loss: torch.Tensor, batch_index: int | str) -> torch.Tensor:
    """Return ``loss`` unchanged, or raise :class:`NonFiniteLossError` naming the batch if it is NaN/inf."""
    if not bool(torch.isfinite(loss.detach()).all()):
        value = loss.detach().reshape(-1)[:4].tolist()
        raise NonFiniteLossError(
            f"non-finite loss {value} at batch {batch_index}: stopping instead of training a NaN model "
            "(lower the learning rate, check the inputs of that batch, or enable gradient clipping)"
        )
    return loss


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _DistCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits whose classes are sharded across workers (rows are the global batch)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group):
        batch = logits.shape[0]
        with torch.no_grad():
            max_logits = logits.max(dim=1, keepdim=True).values
            if _distributed(group):
                dist.all_reduce(max_logits, op=dist.ReduceOp.MAX, group=group)
            probs = torch.exp(logits - max_logits)
            sum_exp = probs.sum(dim=1, keepdim=True)
            if _distributed(group):
                dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            probs = probs / sum_exp
            rows = torch.nonzero(labels != -1).reshape(-1)
            target_prob = torch.zeros(batch, 1, dtype=logits.dtype, device=logits.device)
            target_prob[rows] = probs[rows].gather(1, labels[rows].unsqueeze(1))
            if _distributed(group):
                dist.all_reduce(target_prob, op=dist.ReduceOp.SUM, group=group)
            loss = -target_prob.clamp_min(TARGET_PROB_FLOOR).log().mean()
        ctx.save_for_backward(probs, labels)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        probs, labels = ctx.saved_tensors
        grad = probs.clone()
        rows = torch.nonzero(labels != -1).reshape(-1)
        grad[rows, labels[rows]] -= 1.0
        grad /= probs.shape[0]
        return grad * grad_output, None, None


def dist_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """Mean cross-entropy of the global batch; ``labels`` are local class indices or −1 (not on this worker).

    The gradient is the usual ``(softmax − one_hot) / B`` (the clamp is ignored, as in the reference).
    """
    labels = labels.reshape(-1).long()
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return _DistCrossEntropy.apply(logits, labels, group)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain softmax cross-entropy (mean over rows; rows labelled −1 ignored)."""
    return F.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=-1)


class _AllReduceSum(torch.autograd.Function):
    """Sum across workers; each worker's backward passes its gradient through unchanged.

    Every worker then back-propagates the same global value, and each one's local contribution gets
    the gradient of that global value exactly once.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        out = tensor.clone()
        if _distributed(group):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


MAX_ROW_LOSS = -math.log(TARGET_PROB_FLOOR)
