"""PartialFC: class centres sharded across workers, positives plus sampled negatives, distributed CE.

For N workers each worker owns a contiguous block of the classes (the first ``C % N`` workers one extra).
A step:

1. all-gather the embeddings of the global batch (gradient flows back to each worker's own rows: the
   backward all-reduces the gradient and keeps the local slice) and their labels;
2. map labels to this shard (``-1`` when the class lives elsewhere); with ``sample_rate < 1`` keep every
   positive class of the global batch on this shard plus random negatives up to
   ``ceil(sample_rate · num_local)`` centres;
3. cos θ against the normalised kept centres → the margin head (any head from the registry) → local logits;
4. a distributed cross-entropy: max and Σexp all-reduced (InsightFace's DistCrossEntropy, 1e-30 clamp),
   or for SphereFace2 the weighted BCE summed over all shards.

With ``sample_rate = 1`` the loss and the gradients equal a full softmax over all classes on one worker.
Without an initialised process group (or world size 1) it runs locally.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facepipe.models.heads.centre import CentreTerm, centre_term
from facepipe.models.heads.margins import MarginHead
from facepipe.models.losses import all_reduce_sum, dist_cross_entropy

__all__ = ["PartialFC", "shard_range", "all_gather_with_grad"]


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first class, number of classes)`` owned by ``rank``."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


class _AllGather(torch.autograd.Function):
    """All-gather rows of possibly different counts; backward sums the gradient and keeps the local rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, sizes: list[int]):
        rank = dist.get_rank(group)
        max_rows = max(sizes)
        padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank, ctx.max_rows = group, sizes, rank, max_rows
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _gather_sizes(rows: int, group, device) -> list[int]:
    size = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every worker's rows (any row counts); differentiable w.r.t. the local rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    return _AllGather.apply(tensor, group, _gather_sizes(tensor.shape[0], group, tensor.device))


def _all_gather_labels(labels: torch.Tensor, group) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return labels
    sizes = _gather_sizes(labels.shape[0], group, labels.device)
    padded = labels.new_full((max(sizes),), -1)
    padded[: labels.shape[0]] = labels
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class PartialFC(nn.Module):
    """Sharded class centres + a margin head + distributed cross-entropy.

    Args:
        margin_head: a margin-only head (e.g. ``build_margin_head("arcface")``); it must not own centres.
        embedding_size, num_classes: the global problem size.
        sample_rate: fraction of this shard's centres used per step (positives always kept).
        rank, world_size, group: default to the current process group (or a single worker).
    """

    def __init__(
        self,
        margin_head: MarginHead,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        group=None,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if getattr(margin_head, "weight", None) is not None:
            raise ValueError("pass a margin-only head (built without embedding_size/num_classes)")
        initialised = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = rank if rank is not None else (dist.get_rank(group) if initialised else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size(group) if initialised else 1)
        )
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} workers")
        self.head = margin_head
        if self.world_size > 1:
            margin_head.sync_stats(group)
        self.embedding_size, self.num_classes, self.sample_rate = (
            embedding_size,
            num_classes,
            float(sample_rate),
        )
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        self.num_sample = max(1, math.ceil(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))

    def _local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        local = labels - self.class_start
        inside = (local >= 0) & (local < self.num_local)
        return torch.where(inside, local, torch.full_like(local, -1))

    def sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept centre indices (sorted), labels re-indexed into them)``."""
        if self.num_sample >= self.num_local:
            return torch.arange(self.num_local, device=local_labels.device), local_labels
        positives = torch.unique(local_labels[local_labels != -1], sorted=True)
        score = torch.rand(self.num_local, device=local_labels.device)
        score[positives] = 2.0  # positives always win the top-k
        keep = max(self.num_sample, int(positives.numel()))
        index = torch.topk(score, k=keep).indices.sort().values
        remapped = torch.searchsorted(index, local_labels.clamp(min=0))
        return index, torch.where(local_labels == -1, local_labels, remapped)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The global-batch loss from this worker's embeddings (B_local, D) and global labels (B_local,)."""
        labels = labels.reshape(-1).long()
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes})")
        all_embeddings = all_gather_with_grad(embeddings, self.group)
        all_labels = _all_gather_labels(labels, self.group)
        index, local_labels = self.sample(self._local_labels(all_labels))
        weight = self.weight if index.numel() == self.num_local else self.weight[index]
        norms = all_embeddings.norm(p=2, dim=1, keepdim=True)
        cos = F.linear(
            F.normalize(all_embeddings, dim=1), F.normalize(weight, dim=1).to(all_embeddings.dtype)
        )
        cos = cos.clamp(-1.0, 1.0)
        logits = self.head.margin(cos, local_labels, norms)
        if self.head.loss_kind == "bce":
            inner = self.head.inner if isinstance(self.head, CentreTerm) else self.head
            entry = inner.entry_losses(logits, local_labels).sum()
            count = torch.tensor(float(logits.numel()), dtype=logits.dtype, device=logits.device)
            loss = all_reduce_sum(entry, self.group) / all_reduce_sum(count, self.group)
        else:
            loss = dist_cross_entropy(logits, local_labels, self.group)
        if isinstance(self.head, CentreTerm):
            total, count = centre_term(cos, local_labels)
            n = all_reduce_sum(torch.tensor(float(count), dtype=cos.dtype, device=cos.device), self.group)
            loss = loss + self.head.centre_weight * self.head.s * all_reduce_sum(total, self.group) / n.clamp(
                min=1
            )
        return loss
