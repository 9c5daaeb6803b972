"""demucs' apply_model as explicit work: passes (bag model x shift) and the segments each pass runs.

Everything here mirrors demucs/apply.py sample for sample, so that running the segments and
joining them with the same transition weights gives apply_model's output:
- a pass with shifts>0 sees the mix delayed by `lead` = max_shift - offset, where offset is drawn
  with `rng.randint(0, max_shift)` model by model, shift by shift, in apply_model's order; between
  two draws apply_model runs the pass's forwards, each of which draws once more from the same
  generator (HTDemucs' transformer picks its sine-embedding shift), so the plan draws alike;
- segments start every `stride` samples of the pass; a segment shorter than the model's segment
  (the last ones) is read from a window centred on it, reaching back into real audio, and its
  output is centre-trimmed, as TensorChunk.padded and center_trim do.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from torch import nn


class PlanError(Exception):
    """The model cannot be planned as segments (only HTDemucs-style fixed segments can)."""


@dataclass(frozen=True)
class Pass:
    """One run of one model over the (possibly shifted) mix, with its share of the final average."""

    index: int
    model_index: int
    model: nn.Module
    lead: int
    length: int
    segment: int
    stride: int


@dataclass(frozen=True)
class Segment:
    """One forward pass input: mix samples [start, start + window), zero outside the mix."""

    pass_index: int
    offset: int
    length: int
    start: int
    trim: int

    @property
    def end(self) -> int:
        """Where this segment's output ends, in the pass's own samples."""
        return self.offset + self.length


@dataclass(frozen=True)
class Plan:
    """All passes and segments of one mix, segments ordered so every pass advances together."""

    passes: tuple[Pass, ...]
    segments: tuple[Segment, ...]
    shifts: int
    weights: tuple[tuple[float, ...], ...]
    length: int


def submodels(model: nn.Module) -> tuple[list[nn.Module], list[list[float]]]:
    """The models of a bag with their per-source weights (a single model is a bag of one)."""
    if isinstance(model, BagOfModels):
        return list(model.models), [list(map(float, row)) for row in model.weights]
    return [model], [[1.0] * len(model.sources)]


def make_plan(model: nn.Module, length: int, shifts: int, overlap: float, rng: random.Random) -> Plan:
    """The passes and segments apply_model(model, mix, shifts, split=True, overlap) runs on `length` samples."""
    if length < 1:
        raise PlanError("the mix is empty")
    models, weights = submodels(model)
    passes: list[Pass] = []
    for model_index, sub in enumerate(models):
        if not isinstance(sub, HTDemucs) or not sub.use_train_segment:
            raise PlanError(f"segment planning needs HTDemucs models, got {type(sub).__name__}")
        segment = int(sub.samplerate * sub.segment)
        stride = int((1 - overlap) * segment)
        if stride < 1:
            raise PlanError(f"overlap {overlap} leaves no stride")
        max_shift = int(0.5 * sub.samplerate)
        for _ in range(max(shifts, 1)):
            lead = max_shift - rng.randint(0, max_shift) if shifts else 0
            passes.append(Pass(len(passes), model_index, sub, lead, length + lead, segment, stride))
            for _ in range(0, length + lead, stride):
                _draw_like_forward(sub, rng)
    segments = [segment for one in passes for segment in _segments(one)]
    # Interleave passes by where their segments fall in the mix, so output can be final early.
    segments.sort(key=lambda s: (s.offset - passes[s.pass_index].lead, s.pass_index))
    return Plan(tuple(passes), tuple(segments), shifts, tuple(map(tuple, weights)), length)


def _draw_like_forward(model: HTDemucs, rng: random.Random) -> None:
    transformer = model.crosstransformer
    if transformer is not None and transformer.emb == "sin":
        rng.randrange(transformer.sin_random_shift + 1)


def _segments(one: Pass) -> list[Segment]:
    out = []
    for offset in range(0, one.length, one.stride):
        length = min(one.length - offset, one.segment)
        trim = (one.segment - length) // 2
        out.append(Segment(one.index, offset, length, offset - trim - one.lead, trim))
    return out


def transition_weight(segment: int, power: float = 1.0) -> torch.Tensor:
    """apply_model's triangle, highest mid-segment, to the power `power`."""
    weight = torch.cat([torch.arange(1, segment // 2 + 1), torch.arange(segment - segment // 2, 0, -1)])
    return (weight / weight.max()) ** power


def release_points(plan: Plan) -> list[int]:
    """For each segment index, the first mix sample any segment from there on still reads."""
    points = [0] * (len(plan.segments) + 1)
    points[-1] = plan.length
    for index in range(len(plan.segments) - 1, -1, -1):
        points[index] = min(points[index + 1], max(plan.segments[index].start, 0))
    return points


def total_work(segments: Sequence[Segment]) -> int:
    """Output samples the segments produce, the unit of progress."""
    return sum(segment.length for segment in segments)
