"""Margin heads: properties, robustness at cos θ = ±1, registry, centre term, non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facepipe.errors import FacepipeError, NonFiniteLossError
from facepipe.models.heads import (
    AdaFace,
    ASoftmax,
    CentreTerm,
    arcface_logits,
    combined_margin_logits,
    cosface_logits,
    insightface_combined_logits,
)
from facepipe.models.losses import MAX_ROW_LOSS, check_finite, cross_entropy, dist_cross_entropy
from facepipe.models.registry import MARGIN_HEADS, build_margin_head

HEAD_KW = {"sphereface2": {"total_classes": 6}}


def _edge_cos(dtype=torch.float64):
    """Rows whose target cosine sits at ±1, just inside, and at the ArcFace threshold."""
    torch.manual_seed(0)
    cos = torch.rand(8, 6, dtype=dtype) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    targets = torch.tensor(
        [1.0, -1.0, 1 - 1e-12, -1 + 1e-12, math.cos(math.pi - 0.5), 0.0, 1.0, -1.0], dtype=dtype
    )
    cos[torch.arange(8), labels] = targets
    cos[6, 3] = 1.0
    cos[7, 2] = -1.0  # non-target entries at ±1 too
    return cos, labels


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_head_is_finite_with_finite_gradients_at_plus_minus_one(name, dtype):
    head = build_margin_head(name, **HEAD_KW.get(name, {})).to(dtype).train()
    cos, labels = _edge_cos(dtype)
    cos.requires_grad_(True)
    norms = torch.linspace(0.5, 30, 8, dtype=dtype).unsqueeze(1)
    logits = head.margin(cos, labels, norms)
    loss = check_finite(head.logits_loss(logits, labels), batch_index=0)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(cos.grad).all(), name


@pytest.mark.parametrize("name", sorted(MARGIN_HEADS))
def test_every_head_builds_with_centres_and_returns_logits(name):
    torch.manual_seed(0)
    head = build_margin_head(name, embedding_size=8, num_classes=6, **HEAD_KW.get(name, {}))
    emb = torch.randn(5, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 5])
    logits = head(emb, labels)
    assert logits.shape == (5, 6)
    head.loss(emb, labels).backward()
    assert torch.isfinite(emb.grad).all() and head.weight.grad is not None


def test_registry_rejects_unknown_head():
    with pytest.raises(FacepipeError, match="unknown margin head"):
        build_margin_head("magface-9000")


def test_heads_never_modify_their_input():
    cos, labels = _edge_cos()
    before = cos.clone()
    for fn in (
        lambda: arcface_logits(cos, labels, form="head"),
        lambda: arcface_logits(cos, labels, form="legacy"),
        lambda: cosface_logits(cos, labels),
        lambda: insightface_combined_logits(cos, labels, interclass_filtering_threshold=0.3),
        lambda: combined_margin_logits(cos, labels, 64.0, 0.9, 0.4, 0.15),
    ):
        fn()
        assert torch.equal(cos, before)


def test_rows_labelled_minus_one_are_only_scaled():
    cos, labels = _edge_cos()
    labels = labels.clone()
    labels[[1, 4]] = -1
    for logits in (
        arcface_logits(cos, labels, 64.0, form="head"),
        arcface_logits(cos, labels, 64.0, form="legacy"),
        cosface_logits(cos, labels, 64.0),
        combined_margin_logits(cos, labels, 64.0, 0.9, 0.4, 0.15),
        insightface_combined_logits(cos, labels, 64.0, 1.0, 0.0, 0.2),
    ):
        torch.testing.assert_close(logits[[1, 4]], 64.0 * cos[[1, 4]])


def test_combined_margin_special_cases():
    cos, labels = _edge_cos()
    torch.testing.assert_close(
        combined_margin_logits(cos, labels, 64.0, 1.0, 0.5, 0.0),
        arcface_logits(cos, labels, 64.0, 0.5, form="head"),
    )
    torch.testing.assert_close(
        combined_margin_logits(cos, labels, 64.0, 1.0, 0.0, 0.35), cosface_logits(cos, labels, 64.0, 0.35)
    )
    # the true combined margin, entry by entry
    got = combined_margin_logits(cos, labels, 10.0, 0.9, 0.4, 0.15)
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(float(cos[i, y]))
        assert float(got[i, y]) == pytest.approx(10.0 * (math.cos(0.9 * theta + 0.4) - 0.15), abs=1e-12)


def test_insightface_combined_quirks():
    cos, labels = _edge_cos()
    # m3 > 0 ignores m2 (and m1): exactly CosFace with m3
    torch.testing.assert_close(
        insightface_combined_logits(cos, labels, 64.0, 1.0, 0.3, 0.2), cosface_logits(cos, labels, 64.0, 0.2)
    )
    with pytest.raises(ValueError, match="m1=1,m3=0 or m3>0"):
        insightface_combined_logits(cos, labels, 64.0, 0.9, 0.4, 0.0)
    with pytest.raises(ValueError):
        build_margin_head("insightface_combined", m1=0.9, m2=0.4, m3=0.0)
    # interclass filtering zeroes non-target cosines above the threshold, keeps the target
    filtered = insightface_combined_logits(
        cos, labels, 1.0, 1.0, 0.0, 0.2, interclass_filtering_threshold=0.4
    )
    mask = F.one_hot(labels, 6).bool()
    assert (filtered[(cos > 0.4) & ~mask] == 0).all()
    torch.testing.assert_close(filtered[mask], cos[mask] - 0.2)


def test_arcface_forms_differ_only_beyond_pi_minus_m():
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    cos = x.unsqueeze(1)
    labels = torch.zeros(len(x), dtype=torch.long)
    head = arcface_logits(cos, labels, 1.0, 0.5, form="head").squeeze(1)
    legacy = arcface_logits(cos, labels, 1.0, 0.5, form="legacy").squeeze(1)
    inside = x > math.cos(math.pi - 0.5)
    torch.testing.assert_close(head[inside], legacy[inside])
    assert (torch.diff(legacy) > 0).all()  # legacy is monotonic in cos θ
    assert float(head[0]) == pytest.approx(-math.cos(0.5))  # HEAD: target −1 → −0.8776 (non-monotonic)
    assert float(legacy[0]) == pytest.approx(-1 - math.sin(math.pi - 0.5) * 0.5)
    easy = arcface_logits(cos, labels, 1.0, 0.5, form="legacy", easy_margin=True).squeeze(1)
    torch.testing.assert_close(easy[x <= 0], x[x <= 0])
    with pytest.raises(ValueError):
        arcface_logits(cos, labels, form="head", easy_margin=True)


def test_bad_labels_are_rejected():
    cos = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="labels"):
        cosface_logits(cos, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 rows"):
        cosface_logits(cos, torch.tensor([0, 1, 2]))


def test_dist_cross_entropy_without_process_group_equals_ce_and_caps_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 8, 2, 2, 1])
    a = dist_cross_entropy(logits, labels)
    b = cross_entropy(logits, labels)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)
    huge = torch.tensor([[0.0, 500.0]], dtype=torch.float64)
    assert float(dist_cross_entropy(huge, torch.tensor([0]))) == pytest.approx(MAX_ROW_LOSS)
    assert pytest.approx(69.0776, abs=1e-4) == MAX_ROW_LOSS


def test_check_finite_names_the_batch():
    loss = torch.tensor(1.5)
    assert check_finite(loss, 3) is loss
    with pytest.raises(NonFiniteLossError, match="batch 17"):
        check_finite(torch.tensor(float("nan")), 17)
    with pytest.raises(NonFiniteLossError, match="batch epoch2/41"):
        check_finite(torch.tensor([1.0, float("inf")]), "epoch2/41")


def test_adaface_buffers_update_in_eval_mode_and_single_row_batches_stay_finite():
    head = AdaFace(4, 3).eval()
    emb = F.normalize(torch.randn(5, 4), dim=1)
    head(emb, torch.tensor([0, 1, 2, 0, 1]), norms=torch.full((5, 1), 30.0))
    assert float(head.batch_mean) == pytest.approx(0.01 * 30 + 0.99 * 20)
    mean_before = head.batch_mean.clone()
    out = head(emb[:1], torch.tensor([0]), norms=torch.full((1, 1), 30.0))
    assert torch.isfinite(out).all() and torch.equal(head.batch_mean, mean_before)


def test_a_softmax_lambda_schedules_and_counter():
    caffe = ASoftmax(schedule="caffe").train()
    cos = torch.zeros(2, 3)
    labels = torch.tensor([0, 1])
    norms = torch.ones(2, 1)
    caffe.margin(cos, labels, norms)
    assert int(caffe.it) == 1 and caffe.current_lambda == pytest.approx(1000 / 1.12)
    caffe.eval()
    caffe.margin(cos, labels, norms)
    assert int(caffe.it) == 1  # eval does not advance the annealing
    caffe.it.fill_(10**6)
    assert caffe.current_lambda == 5.0
    clc = ASoftmax(schedule="clcarwin").train()
    clc.margin(cos, labels, norms)
    assert clc.current_lambda == pytest.approx(1500 / 1.1)
    with pytest.raises(ValueError, match="norms"):
        clc.margin(cos, labels)


def test_a_softmax_target_is_psi_blend():
    head = ASoftmax(schedule="caffe").eval()
    cos = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    lam = head.current_lambda  # it = 0 -> base
    logits = head.margin(cos, torch.tensor([0]), torch.tensor([[2.0]], dtype=torch.float64))
    theta = math.acos(0.3)
    k = math.floor(4 * theta / math.pi)
    psi = (-1) ** k * math.cos(4 * theta) - 2 * k
    assert float(logits[0, 0]) == pytest.approx(2.0 * (lam * 0.3 + psi) / (1 + lam), abs=1e-12)
    assert float(logits[0, 1]) == pytest.approx(1.6)


def test_centre_term_adds_scaled_mean_distance_to_centre():
    torch.manual_seed(0)
    head = build_margin_head("arcface", centre_weight=0.5, embedding_size=4, num_classes=3, s=10.0)
    assert isinstance(head, CentreTerm)
    emb = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    head = head.double()
    cos, _ = head.cosine(emb)
    inner_loss = head.inner.loss(emb, labels)
    expected = inner_loss + 0.5 * 10.0 * (1 - cos[torch.arange(6), labels]).mean()
    torch.testing.assert_close(head.loss(emb, labels), expected)
    torch.testing.assert_close(head(emb, labels), head.inner(emb, labels))  # logits unchanged


def test_centre_term_pulls_embeddings_towards_their_centre():
    torch.manual_seed(0)
    head = CentreTerm(build_margin_head("cosface", embedding_size=4, num_classes=2, s=4.0), weight=5.0)
    emb = torch.randn(4, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.SGD([emb], lr=0.1)

    def mean_target_cos():
        cos, _ = head.cosine(emb)
        return float(cos[torch.arange(4), labels].mean().detach())

    start = mean_target_cos()
    for _ in range(20):
        opt.zero_grad()
        head.loss(emb, labels).backward()
        opt.step()
    assert mean_target_cos() > start + 0.1
