from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from separator.models import LoadedModel, load_model
from separator.separation import SeparationCancelled, SeparationError, separate, stem_groups

SAMPLERATE = 44100
# Within one 2 s segment of the tiny models even after a 0.5 s shift; odd, so nothing rounds to a hop.
SHORT = SAMPLERATE + 7
# Past one segment's 1.8 s stride at overlap 0.1, so the pass runs two segments.
TWO_SEGMENTS = 2 * SAMPLERATE + SAMPLERATE // 2
Reference = Callable[..., dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def htdemucs(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs", tiny_repo)


@pytest.fixture(scope="module")
def htdemucs_6s(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs_6s", tiny_repo)


def noise(samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((2, samples))).astype(np.float32)


def assert_stems(stems: dict[str, np.ndarray], names: tuple[str, ...], samples: int) -> None:
    assert tuple(stems) == names
    for stem in stems.values():
        assert stem.shape == (2, samples)
        assert stem.dtype == np.float32
        assert np.isfinite(stem).all()


@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_6s", "htdemucs_ft"])
@pytest.mark.parametrize("quality", ["fast", "balanced", "best"])
def test_every_model_and_preset_equals_apply_model(
    tiny_repo: Path, reference: Reference, name: str, quality: str
) -> None:
    model = load_model(name, tiny_repo)
    mix = noise(2 * SAMPLERATE + 10_011, seed=3)
    expected = reference(model, mix, quality, seed=7)

    stems = separate(model, mix, quality=quality, stems=6 if len(model.sources) == 6 else 4, seed=7)

    assert set(stems) == set(model.sources)
    for source in model.sources:
        np.testing.assert_array_equal(stems[source], expected[source])


def test_six_stems_and_their_four_stem_fold(htdemucs_6s: LoadedModel) -> None:
    mix = noise(SHORT)
    six = separate(htdemucs_6s, mix, stems=6)
    four = separate(htdemucs_6s, mix, stems=4)

    assert_stems(six, ("drums", "bass", "other", "vocals", "guitar", "piano"), SHORT)
    assert_stems(four, ("drums", "bass", "other", "vocals"), SHORT)
    np.testing.assert_allclose(four["other"], six["other"] + six["guitar"] + six["piano"], atol=1e-5)
    np.testing.assert_array_equal(four["vocals"], six["vocals"])


def test_two_stems_are_vocals_and_the_sum_of_the_rest(htdemucs: LoadedModel) -> None:
    mix = noise(SHORT)
    two = separate(htdemucs, mix, stems=2)
    four = separate(htdemucs, mix, stems=4)

    assert_stems(two, ("vocals", "accompaniment"), SHORT)
    np.testing.assert_array_equal(two["vocals"], four["vocals"])
    np.testing.assert_allclose(two["accompaniment"], four["drums"] + four["bass"] + four["other"], atol=1e-5)


def test_residual_makes_the_stems_sum_to_the_mix(htdemucs: LoadedModel) -> None:
    mix = noise(TWO_SEGMENTS)
    stems = separate(htdemucs, mix, stems=2, residual=True)

    assert_stems(stems, ("vocals", "accompaniment", "residual"), TWO_SEGMENTS)
    total = sum(stem.astype(np.float64) for stem in stems.values())
    # Only the residual's own rounding to float32 remains.
    np.testing.assert_allclose(total, mix, rtol=0, atol=1e-7)
    assert np.abs(stems["residual"]).max() > 0


def test_shifted_runs_depend_on_the_seed_alone(htdemucs: LoadedModel) -> None:
    mix = noise(SHORT)
    first = separate(htdemucs, mix, quality="best", seed=1)
    again = separate(htdemucs, mix, quality="best", seed=1)
    other = separate(htdemucs, mix, quality="best", seed=2)

    np.testing.assert_array_equal(first["vocals"], again["vocals"])
    assert not np.array_equal(first["vocals"], other["vocals"])


def test_bag_of_models_reports_progress_per_model(tiny_repo: Path) -> None:
    reports: list[float] = []
    stems = separate(load_model("htdemucs_ft", tiny_repo), noise(SHORT), progress=reports.append)

    assert_stems(stems, ("drums", "bass", "other", "vocals"), SHORT)
    assert reports == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_progress_rises_per_segment_to_one(htdemucs: LoadedModel) -> None:
    reports: list[float] = []
    separate(htdemucs, noise(TWO_SEGMENTS), progress=reports.append)

    # Segments of 2 s every 1.8 s: the first yields 2 s of output, the second the remaining 0.7 s.
    segment, stride = 2 * SAMPLERATE, int(0.9 * 2 * SAMPLERATE)
    assert reports == [0.0, pytest.approx(segment / (segment + TWO_SEGMENTS - stride)), 1.0]


def test_shifted_passes_report_each_segment(htdemucs: LoadedModel) -> None:
    reports: list[float] = []
    stems = separate(htdemucs, noise(SHORT), quality="best", progress=reports.append)

    assert_stems(stems, ("drums", "bass", "other", "vocals"), SHORT)
    # Overlap 0.5 strides 1 s and every shifted pass outgrows that: two passes of two segments.
    assert len(reports) == 5
    assert reports == sorted(set(reports))
    assert reports[-1] == 1.0


def test_cancellation_stops_between_segments(htdemucs: LoadedModel) -> None:
    reports: list[float] = []

    with pytest.raises(SeparationCancelled):
        separate(htdemucs, noise(4 * SAMPLERATE), progress=reports.append, should_cancel=lambda: len(reports) > 1)
    assert len(reports) == 2
    assert reports[-1] < 1.0


def test_cancellation_before_the_first_segment(htdemucs: LoadedModel) -> None:
    reports: list[float] = []

    with pytest.raises(SeparationCancelled):
        separate(htdemucs, noise(SHORT), progress=reports.append, should_cancel=lambda: True)
    assert reports == []


def test_stem_groups_fold_extra_sources_into_other_and_accompaniment() -> None:
    six = ("drums", "bass", "other", "vocals", "guitar", "piano")

    assert stem_groups(six, 4)["other"] == ("other", "guitar", "piano")
    assert stem_groups(six, 2) == {
        "vocals": ("vocals",),
        "accompaniment": ("drums", "bass", "other", "guitar", "piano"),
    }


@pytest.mark.parametrize(
    ("sources", "stems"), [(("drums", "bass", "other", "vocals"), 6), (("a", "b"), 4), (("a",), 2)]
)
def test_unavailable_stem_sets_are_refused(sources: tuple[str, ...], stems: int) -> None:
    with pytest.raises(SeparationError) as raised:
        stem_groups(sources, stems)
    assert raised.value.code == "stems_unsupported"


def test_six_stems_from_a_four_source_model_are_refused_before_work(htdemucs: LoadedModel) -> None:
    with pytest.raises(SeparationError) as raised:
        separate(htdemucs, noise(SHORT), stems=6, should_cancel=pytest.fail)
    assert raised.value.code == "stems_unsupported"


def test_unknown_quality_is_refused(htdemucs: LoadedModel) -> None:
    with pytest.raises(SeparationError) as raised:
        separate(htdemucs, noise(SHORT), quality="ultra")
    assert raised.value.code == "quality_unknown"


@pytest.mark.parametrize(
    "mix",
    [np.zeros((1, SHORT), np.float32), np.zeros(SHORT, np.float32), np.full((2, SHORT), np.nan, np.float32)],
)
def test_malformed_mixes_are_refused(htdemucs: LoadedModel, mix: np.ndarray) -> None:
    with pytest.raises(SeparationError) as raised:
        separate(htdemucs, mix)
    assert raised.value.code == "invalid_audio"
