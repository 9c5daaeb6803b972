"""Joining segment outputs with apply_model's transition weights, keeping only the unfinished tail.

The arithmetic follows demucs/apply.py operation by operation (weighted sum in segment order,
division by the summed weights, mean over shifts, weighted mean over the bag), so the result is
apply_model's to the last bit wherever the segment outputs are.
"""

from __future__ import annotations

import torch

from .plan import Plan, Segment, transition_weight


class PassSum:
    """The weighted overlap-add of one pass, over pass samples [base, base + buffered)."""

    def __init__(self, sources: int, channels: int, weight: torch.Tensor) -> None:
        self.base = 0
        self._weight = weight
        self._out = torch.zeros(sources, channels, 0)
        self._sum_weight = torch.zeros(0)

    def add(self, segment: Segment, output: torch.Tensor) -> None:
        """Add a segment's trimmed output (sources, channels, segment.length) at its offset."""
        needed = segment.end - self.base - self._sum_weight.shape[0]
        if needed > 0:
            self._out = torch.cat([self._out, self._out.new_zeros(*self._out.shape[:2], needed)], dim=-1)
            self._sum_weight = torch.cat([self._sum_weight, self._sum_weight.new_zeros(needed)])
        weight = self._weight[: segment.length]
        start = segment.offset - self.base
        self._out[..., start : start + segment.length] += weight * output
        self._sum_weight[start : start + segment.length] += weight

    def take(self, upto: int) -> torch.Tensor:
        """Finished output for pass samples [base, upto), dropped from the buffer."""
        count = upto - self.base
        out = self._out[..., :count] / self._sum_weight[:count]
        self._out = self._out[..., count:]
        self._sum_weight = self._sum_weight[count:]
        self.base = upto
        return out


class Joiner:
    """Collects segment outputs of one plan and hands out final mix-aligned output in order."""

    def __init__(self, plan: Plan, sources: int, channels: int) -> None:
        self._plan = plan
        self._sums = [PassSum(sources, channels, transition_weight(p.segment)) for p in plan.passes]
        self._by_model: dict[int, list[int]] = {}
        for one in plan.passes:
            self._by_model.setdefault(one.model_index, []).append(one.index)
        # Pass samples below this are final: no later segment of the pass starts before it.
        self._final = [0] * len(plan.passes)
        self.emitted = 0

    def add(self, segment: Segment, output: torch.Tensor) -> None:
        """Add one segment's raw model output (sources, channels, window), in plan order."""
        self._sums[segment.pass_index].add(segment, output[..., segment.trim : segment.trim + segment.length])
        one = self._plan.passes[segment.pass_index]
        self._final[segment.pass_index] = min(one.length, segment.offset + one.stride)

    def ready(self) -> int:
        """How many mix samples are final and not yet taken."""
        frontier = min(final - one.lead for final, one in zip(self._final, self._plan.passes, strict=True))
        return max(0, min(frontier, self._plan.length) - self.emitted)

    def take(self, count: int) -> torch.Tensor:
        """The next `count` final samples of the model's sources, (sources, channels, count)."""
        start, end = self.emitted, self.emitted + count
        plan = self._plan
        estimates: float | torch.Tensor = 0.0
        totals = [0.0] * len(plan.weights[0])
        for model_index, pass_indices in self._by_model.items():
            out: float | torch.Tensor = 0.0
            for index in pass_indices:
                lead = plan.passes[index].lead
                if self._sums[index].base < lead + start:
                    # A shifted pass starts `lead` samples before the mix; apply_model drops those.
                    self._sums[index].take(lead + start)
                out = out + self._sums[index].take(lead + end)
            if plan.shifts:
                out = out / plan.shifts
            assert isinstance(out, torch.Tensor)
            for k, weight in enumerate(plan.weights[model_index]):
                out[k] *= weight
                totals[k] += weight
            estimates = estimates + out
        assert isinstance(estimates, torch.Tensor)
        for k, total in enumerate(totals):
            estimates[k] /= total
        self.emitted = end
        return estimates
