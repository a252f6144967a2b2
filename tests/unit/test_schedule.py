"""The learning-rate schedule: warmup, polynomial decay by steps or by a wall-clock budget, state."""

from __future__ import annotations

import pytest
import torch

from facepipe.train.schedule import BudgetSchedule, budget_lr_factor, lr_factor


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_without_budget_it_is_the_step_schedule() -> None:
    for step in range(0, 101, 7):
        assert budget_lr_factor(step, 100, 10, 2.0) == lr_factor(step, 100, 10, 2.0)


def test_the_budget_anneals_a_run_cut_short_by_time() -> None:
    # a run planned for 1000 steps that has used its whole budget after 100 is annealed to 0
    assert budget_lr_factor(100, 1000, 10, 2.0, elapsed_s=60.0, budget_s=60.0) == 0.0
    half = budget_lr_factor(100, 1000, 10, 1.0, elapsed_s=30.0, budget_s=60.0)
    assert half == pytest.approx(0.5)
    # step progress still wins when it is ahead of time
    assert budget_lr_factor(900, 1000, 0, 1.0, elapsed_s=1.0, budget_s=60.0) == pytest.approx(0.1)


def test_warmup_ignores_time() -> None:
    assert budget_lr_factor(0, 100, 10, 2.0, elapsed_s=50.0, budget_s=60.0) == pytest.approx(0.1)


def test_schedule_sets_rates_and_survives_a_checkpoint() -> None:
    opt = _optimizer(0.2)
    sched = BudgetSchedule(opt, total_steps=100, warmup_steps=0, power=1.0, budget_s=100.0)
    assert sched.get_last_lr() == [pytest.approx(0.2)]
    for i in range(10):
        sched.step(elapsed_s=5.0 * (i + 1))  # time runs ahead of steps: 50% of the budget after 10 steps
    assert sched.get_last_lr() == [pytest.approx(0.1)]
    state = sched.state_dict()

    opt2 = _optimizer(0.2)
    resumed = BudgetSchedule(opt2, total_steps=100, warmup_steps=0, power=1.0, budget_s=100.0)
    resumed.load_state_dict(state)
    assert resumed.elapsed_s == 50.0 and resumed.step_count == 10
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
