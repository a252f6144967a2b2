"""Checkpoints and bundles round-trip; the LR schedule and batch plans behave as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facepipe.data.sampling import _window_batches, epoch_plan, windows
from facepipe.errors import FacepipeError
from facepipe.models.bundle import BundleInfo, find_bundle, load_bundle, save_bundle
from facepipe.train.backbone import margin_head_kwargs
from facepipe.train.checkpoint import load_training_state, save_training_state
from facepipe.train.finetune import triplet_loss
from facepipe.train.mailbox import EventLog, read_events
from facepipe.train.schedule import lr_factor


def test_training_state_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_training_state(
        tmp_path / "ckpt", {"model": model.state_dict(), "optimizer": opt.state_dict()}, {"step": 7}
    )
    state, meta = load_training_state(tmp_path / "ckpt")
    assert meta == {"step": 7}
    assert torch.equal(state["model"]["weight"], model.weight)
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    assert not list(tmp_path.joinpath("ckpt").glob(".*.tmp"))


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"partial")
    with pytest.raises(FacepipeError, match="not a complete training checkpoint"):
        load_training_state(tmp_path / "ckpt")


def test_bundle_rebuilds_the_same_backbone(tmp_path):
    from facepipe.models.registry import build_backbone

    torch.manual_seed(0)
    kwargs = {"embedding_size": 16, "input_size": [32, 32]}
    backbone = build_backbone("iresnet_tiny", **kwargs).eval()
    centres = torch.randn(5, 16)
    info = BundleInfo("iresnet_tiny", kwargs, 16, (32, 32), "BGR", 5, "arcface", {"margin_s": 64.0})
    save_bundle(tmp_path / "run" / "ckpt" / "bundle", backbone, info, centres)
    loaded, info2, centres2 = load_bundle(tmp_path / "run")  # found below the given folder
    assert info2 == info and torch.equal(centres2, centres)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), backbone(x))
    assert json.loads((find_bundle(tmp_path) / "bundle.json").read_text())["color_order"] == "BGR"
    with pytest.raises(FacepipeError, match="no backbone bundle"):
        (tmp_path / "none").mkdir() or find_bundle(tmp_path / "none")


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_factor(s, 100, 10, 2.0) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_margin_kwargs_only_where_accepted():
    assert margin_head_kwargs("cosface", 30.0, 0.35, {}) == {"s": 30.0, "m": 0.35}
    assert margin_head_kwargs("normface", 30.0, 0.35, {}) == {"s": 30.0}
    assert margin_head_kwargs("combined", 64.0, 0.5, {"m2": 0.3}) == {"s": 64.0, "m2": 0.3}


def test_event_log_appends_lines(tmp_path):
    log = EventLog(str(tmp_path / "e.jsonl"))
    log.write(event="step", step=1)
    log.write(event="step", step=2)
    assert [e["step"] for e in read_events(tmp_path / "e.jsonl")] == [1, 2]
    EventLog(None).write(event="ignored")


def _labels(classes: int, per_class: int, units: int) -> list[np.ndarray]:
    labels = np.repeat(np.arange(classes), per_class)
    return np.array_split(labels, units)


def test_pk_batches_hold_p_classes_of_k_images():
    labels = _labels(20, 6, 4)
    batches = _window_batches(labels, [0, 1, 2, 3], np.random.default_rng(0), (4, 3), 0)
    assert batches
    for batch in batches:
        lab = np.array([labels[u][r] for u, r in batch])
        values, counts = np.unique(lab, return_counts=True)
        assert len(lab) == 12 and counts.min() >= 3 and len(values) <= 4


def test_epoch_plan_is_disjoint_equal_and_deterministic():
    from types import SimpleNamespace

    labels = _labels(30, 8, 6)
    units = [SimpleNamespace(rows=len(x)) for x in labels]
    groups = windows(units, 80)
    plans = [epoch_plan(labels, groups, 1, 0, r, 2, None, 16) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) > 0
    rows = [tuple(p) for plan in plans for batch in plan for p in batch]
    assert len(rows) == len(set(rows))
    again = epoch_plan(labels, groups, 1, 0, 0, 2, None, 16)
    assert all(np.array_equal(a, b) for a, b in zip(plans[0], again, strict=True))


def test_triplet_loss_mines_hard_examples():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separated = torch.eye(6)[[0, 0, 1, 1, 2, 2]] * 5
    loss, terms = triplet_loss(separated, labels, margin=0.2)
    assert float(loss) == 0.0 and float(terms["active_fraction"]) == 0.0
    mixed = torch.randn(6, 8, requires_grad=True)
    for hardest in (True, False):
        loss, _ = triplet_loss(mixed, labels, margin=0.5, hardest=hardest)
        loss.backward()
        assert float(loss.detach()) > 0 and mixed.grad is not None
    with pytest.raises(FacepipeError):
        triplet_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), margin=0.2)
