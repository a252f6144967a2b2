"""PartialFC: with sample_rate=1 it equals the full softmax (loss and gradients), on 2 gloo workers and 1."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facepipe.models.heads.centre import centre_term
from facepipe.models.partial_fc import PartialFC, shard_range
from facepipe.models.registry import build_margin_head

D, C = 16, 11  # 11 classes: uneven shards (6 + 5)
ROWS = (7, 5)  # uneven per-worker batches
HEADS = {
    "arcface": {"s": 16.0, "m": 0.5},
    "cosface": {"s": 16.0, "m": 0.35},
    "combined": {"s": 16.0, "m1": 0.9, "m2": 0.3, "m3": 0.1},
    "adaface": {"s": 16.0},
    "curricularface": {"s": 16.0, "m": 0.5},
    "sphereface2": {"total_classes": C, "r": 16.0},
    "arcface+centre": {"s": 16.0, "m": 0.5, "centre_weight": 0.1},
}


def _build_head(name: str):
    kw = dict(HEADS[name])
    return build_margin_head(name.split("+")[0], **kw)


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(sum(ROWS), D, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, C, (sum(ROWS),), generator=g)
    labels[:3] = torch.tensor([0, C - 1, 5])  # both shards' edges
    weight = torch.randn(C, D, generator=g, dtype=dtype)
    return emb, labels, weight


def _full_softmax(name: str, emb, labels, weight):
    """Reference: the head over all classes on one worker, plain loss."""
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    head = _build_head(name).to(emb.dtype)
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1)).clamp(-1, 1)
    logits = head.margin(cos, labels, emb.norm(dim=1, keepdim=True))
    loss = head.logits_loss(logits, labels)
    if "centre" in name:
        total, count = centre_term(cos, labels)
        loss = loss + head.centre_weight * head.s * total / count
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _run_partial(name: str, emb_local, labels_local, weight_full, rank: int, world: int, sample_rate=1.0):
    start, n = shard_range(C, rank, world)
    pfc = PartialFC(_build_head(name), D, C, sample_rate=sample_rate).to(emb_local.dtype)
    assert (pfc.class_start, pfc.num_local) == (start, n)
    with torch.no_grad():
        pfc.weight.copy_(weight_full[start : start + n])
    emb_local = emb_local.clone().requires_grad_(True)
    loss = pfc(emb_local, labels_local)
    loss.backward()
    return loss.detach(), emb_local.grad, pfc.weight.grad


def _run_sampled(emb_local, labels_local, weight_full, rank: int, world: int):
    """sample_rate=0.5 on each shard: returns the loss and the global ids of the kept centres."""
    start, n = shard_range(C, rank, world)
    pfc = PartialFC(build_margin_head("cosface", s=16.0), D, C, sample_rate=0.5).double()
    with torch.no_grad():
        pfc.weight.copy_(weight_full[start : start + n])
    torch.manual_seed(100 + rank)
    loss = pfc(emb_local, labels_local)
    gathered = [torch.empty(r, dtype=torch.long) for r in ROWS]
    _gather_uneven(gathered, labels_local)
    torch.manual_seed(100 + rank)  # replay the same draw to learn which centres were kept
    index, _ = pfc.sample(pfc._local_labels(torch.cat(gathered)))
    return loss.detach(), index + start


def _gather_uneven(out: list[torch.Tensor], local: torch.Tensor) -> None:
    padded = torch.full((max(ROWS),), -1, dtype=torch.long)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in ROWS]
    dist.all_gather(parts, padded)
    for i, r in enumerate(ROWS):
        out[i].copy_(parts[i][:r])


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels, weight = _problem()
        lo = sum(ROWS[:rank])
        rows = slice(lo, lo + ROWS[rank])
        results = {}
        for name in HEADS:
            results[name] = _run_partial(name, emb[rows], labels[rows], weight, rank, world)
        results["sampled"] = _run_sampled(emb[rows], labels[rows], weight, rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_workers_match_full_softmax(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    emb, labels, weight = _problem()
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # sampled: the loss is the softmax over the union of the centres the workers kept
    kept = torch.cat([per_rank[r]["sampled"][1] for r in range(2)])
    assert set(labels.tolist()) <= set(kept.tolist()) and kept.numel() < C
    remapped = torch.searchsorted(kept, labels)
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight[kept], dim=1))
    ref = F.cross_entropy(16.0 * (cos - 0.4 * F.one_hot(remapped, kept.numel()).double()), remapped)
    for r in range(2):
        torch.testing.assert_close(per_rank[r]["sampled"][0], ref, rtol=1e-10, atol=1e-12)
    for name in HEADS:
        ref_loss, ref_emb_grad, ref_w_grad = _full_softmax(name, emb, labels, weight)
        emb_grads, w_grads = [], []
        for rank in range(2):
            loss, emb_grad, w_grad = per_rank[rank][name]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, msg=f"{name} loss rank {rank}")
            emb_grads.append(emb_grad)
            w_grads.append(w_grad)
        torch.testing.assert_close(torch.cat(emb_grads), ref_emb_grad, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(torch.cat(w_grads), ref_w_grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", list(HEADS))
def test_single_worker_matches_full_softmax(name):
    emb, labels, weight = _problem()
    loss, emb_grad, w_grad = _run_partial(name, emb, labels, weight, 0, 1)
    ref_loss, ref_emb_grad, ref_w_grad = _full_softmax(name, emb, labels, weight)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(emb_grad, ref_emb_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_grad, ref_w_grad, rtol=1e-9, atol=1e-12)


def test_sampling_keeps_positives_and_equals_softmax_over_kept_classes():
    g = torch.Generator().manual_seed(1)
    num_classes, d = 200, 8
    emb = torch.randn(10, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (10,), generator=g)
    pfc = PartialFC(build_margin_head("cosface", s=8.0), d, num_classes, sample_rate=0.1).double()
    assert pfc.num_sample == math.ceil(0.1 * num_classes)
    torch.manual_seed(5)
    loss = pfc(emb, labels)
    torch.manual_seed(5)
    index, remapped = pfc.sample(labels)
    assert index.numel() == pfc.num_sample
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[remapped], labels)
    w = pfc.weight.detach()[index]
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(w, dim=1))
    ref = F.cross_entropy(8.0 * (cos - 0.4 * F.one_hot(remapped, index.numel()).double()), remapped)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    untouched = torch.ones(num_classes, dtype=torch.bool)
    untouched[index] = False
    assert pfc.weight.grad[untouched].abs().max() == 0  # only kept centres get gradients


def test_more_positives_than_sample_keeps_all_positives():
    pfc = PartialFC(build_margin_head("arcface"), 4, 50, sample_rate=0.02)
    labels = torch.arange(0, 50, 5)
    index, remapped = pfc.sample(labels)
    assert torch.equal(index, labels) and torch.equal(remapped, torch.arange(10))


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="margin-only"):
        PartialFC(build_margin_head("arcface", embedding_size=4, num_classes=5), 4, 5)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(build_margin_head("arcface"), 4, 5, sample_rate=0.0)
    pfc = PartialFC(build_margin_head("arcface"), 4, 5)
    with pytest.raises(ValueError, match="labels"):
        pfc(torch.randn(2, 4), torch.tensor([0, 5]))


def test_shard_ranges_cover_all_classes_once():
    for num_classes in (7, 10, 85742):
        for world in (1, 2, 3, 8):
            covered = []
            for r in range(world):
                start, n = shard_range(num_classes, r, world)
                covered.extend(range(start, start + n))
            assert covered == list(range(num_classes))
