"""Learning-rate schedule that also respects a wall-clock budget.

Warmup is linear over the first steps; after it the rate decays polynomially to 0 with training progress.
Progress is the larger of steps done / planned steps and seconds used / budget seconds: a run cut by
`max_minutes` then ends with its rate annealed, as a step-planned run does, instead of stopping at a high
rate (which costs several points of verification accuracy on a short CPU run).
"""

from __future__ import annotations

from typing import Any


def lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Linear warmup to 1 over `warmup_steps`, then (1 - progress)^power down to 0 at `total_steps`."""
    return budget_lr_factor(step, total_steps, warmup_steps, power)


def budget_lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    power: float,
    elapsed_s: float = 0.0,
    budget_s: float | None = None,
) -> float:
    """`lr_factor` where progress is also measured in time: max(step progress, elapsed / budget)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / span
    if budget_s:
        progress = max(progress, elapsed_s / budget_s)
    return max(1.0 - progress, 0.0) ** power


class BudgetSchedule:
    """Sets each parameter group's rate from (step, elapsed seconds); state survives a checkpoint.

    Every rank must pass the same `elapsed_s` (agree on it first) so that DDP replicas stay identical.
    """

    def __init__(
        self,
        optimizer: Any,
        total_steps: int,
        warmup_steps: int,
        power: float,
        budget_s: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.power = power
        self.budget_s = budget_s
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.elapsed_s = 0.0
        self._apply()

    def _apply(self) -> None:
        factor = budget_lr_factor(
            self.step_count, self.total_steps, self.warmup_steps, self.power, self.elapsed_s, self.budget_s
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self, elapsed_s: float) -> None:
        """One optimiser step was taken; `elapsed_s` is the training time used so far (all attempts)."""
        self.step_count += 1
        self.elapsed_s = float(elapsed_s)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "step_count": self.step_count, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.step_count = int(state["step_count"])
        self.elapsed_s = float(state["elapsed_s"])
        self._apply()
