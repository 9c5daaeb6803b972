"""Practice mixes rendered from real audio files: gains, loudness, tempo, pitch, sections, loops, click, formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import soxr

from analyzer.mixing import MixError, MixPlan, click_times, loudness, render

SR = 44100


def _tone(freq: float, seconds: float, level: float = 0.2) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return level * np.sin(2 * np.pi * freq * t)


def _pulses(period: float, seconds: float, first: float = 0.0) -> np.ndarray:
    """A decaying noise burst every `period` from `first`: sharp onsets, like a hi-hat."""
    n = round(seconds * SR)
    t = np.arange(n) / SR
    since = np.where(t >= first, (t - first) % period, np.inf)
    rng = np.random.default_rng(7)
    return 0.3 * np.exp(-since / 0.01) * rng.uniform(-1, 1, n)


@pytest.fixture
def song(tmp_path: Path) -> dict[str, object]:
    """Four stems of 12 s (a vocal-like tone, bass, drums, wide noise) and the original they sum to."""
    seconds = 12.0
    rng = np.random.default_rng(3)
    vocals = np.stack([_tone(440, seconds), _tone(440, seconds)])
    bass = np.stack([_tone(55, seconds, 0.25), _tone(55, seconds, 0.25)])
    drums = np.stack([_pulses(0.5, seconds), _pulses(0.5, seconds)])
    other = np.stack([0.05 * rng.uniform(-1, 1, vocals.shape[1]), 0.02 * rng.uniform(-1, 1, vocals.shape[1])])
    stems = {"vocals": vocals, "bass": bass, "drums": drums, "other": other}
    original = sum(stems.values())
    sf.write(tmp_path / "audio.wav", original.T, SR, subtype="FLOAT")
    paths = {}
    for name, samples in stems.items():
        paths[name] = str(tmp_path / f"{name}.wav")
        sf.write(paths[name], samples.T, SR, subtype="PCM_24")
    return {"dir": tmp_path, "original": str(tmp_path / "audio.wav"), "stems": paths, "samples": original}


def _plan(song: dict[str, object], gains: dict[str, float] | None = None, **kwargs: object) -> MixPlan:
    stems = song["stems"]
    assert isinstance(stems, dict)
    chosen = [(path, (gains or {}).get(name, 1.0)) for name, path in stems.items()]
    return MixPlan(stems=chosen, original=str(song["original"]), **kwargs)  # type: ignore[arg-type]


def _read(path: Path) -> np.ndarray:
    samples, sr = sf.read(path, dtype="float64", always_2d=True)
    assert sr == SR
    return samples.T


def _db(x: np.ndarray, reference: np.ndarray) -> float:
    return float(20 * np.log10(max(np.sqrt(np.mean(x**2)), 1e-12) / np.sqrt(np.mean(reference**2))))


def _peak_frequency(x: np.ndarray) -> float:
    """The strongest frequency of a mono signal, interpolated between bins."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / len(x)


def _onsets(x: np.ndarray, threshold: float, gap_s: float = 0.05) -> list[float]:
    """Times where |x| first passes the threshold, at least `gap_s` after the previous one."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    found: list[int] = []
    for i in loud:
        if not found or i - found[-1] > gap_s * SR:
            found.append(int(i))
    return [i / SR for i in found]


@pytest.mark.parametrize(("fmt", "depth", "limit_db"), [("wav", 32, -100.0), ("flac", 24, -100.0), ("wav", 16, -60.0)])
def test_stems_at_unity_mix_back_to_the_original(song, tmp_path, fmt, depth, limit_db):
    out = tmp_path / f"unity.{fmt}"
    rendered = render(_plan(song, format=fmt, bit_depth=depth), out)
    original = song["samples"]
    mixed = _read(out)
    assert mixed.shape == original.shape
    assert _db(mixed - original, original) < limit_db
    assert abs(rendered.gain_db) < 0.001


def test_muting_the_vocals_keeps_the_original_loudness(song, tmp_path):
    out = tmp_path / "karaoke.wav"
    rendered = render(_plan(song, {"vocals": 0.0}, bit_depth=32), out)
    original = song["samples"]
    assert rendered.gain_db > 0.5  # the vocals' share is made up
    assert loudness(_read(out), SR) == pytest.approx(loudness(original, SR), abs=0.1)
    assert rendered.loudness_lufs == pytest.approx(loudness(original, SR), abs=0.1)


def test_loudness_matching_never_clips_what_the_original_did_not(song, tmp_path):
    out = tmp_path / "solo.wav"
    render(_plan(song, {"vocals": 0.0, "bass": 0.0, "drums": 4.0, "other": 0.0}, bit_depth=32), out)
    peak = np.max(np.abs(song["samples"]))
    assert np.max(np.abs(_read(out))) <= max(peak, 10 ** (-1 / 20)) + 1e-6


def test_loudness_is_bs1770_as_pyloudnorm_measures_it(song):
    samples = song["samples"]
    expected = pyloudnorm.Meter(SR).integrated_loudness(samples.T)
    assert loudness(samples, SR) == pytest.approx(expected, abs=0.01)
    assert loudness(np.zeros((2, SR)), SR) == float("-inf")


@pytest.mark.parametrize("tempo", [0.5, 0.75, 1.25, 1.5])
def test_tempo_changes_the_duration_by_its_ratio(song, tmp_path, tempo):
    out = tmp_path / "tempo.wav"
    rendered = render(_plan(song, tempo=tempo), out)
    assert sf.info(out).frames == round(song["samples"].shape[1] / tempo)
    assert rendered.duration_s == pytest.approx(12.0 / tempo, abs=1e-3)


def test_tempo_keeps_the_pitch(song, tmp_path):
    out = tmp_path / "slow.wav"
    render(_plan(song, {"bass": 0.0, "drums": 0.0, "other": 0.0}, tempo=0.75), out)
    assert _peak_frequency(_read(out)[0, SR : 10 * SR]) == pytest.approx(440.0, rel=0.002)


@pytest.mark.parametrize(
    ("semitones", "quality"), [(-2.0, "balanced"), (7.0, "fast"), (-12.0, "best"), (0.5, "balanced")]
)
def test_pitch_shift_moves_a_sine_by_the_ratio_and_keeps_the_duration(song, tmp_path, semitones, quality):
    out = tmp_path / "shifted.wav"
    plan = _plan(song, {"bass": 0.0, "drums": 0.0, "other": 0.0}, semitones=semitones, quality=quality)
    render(plan, out)
    shifted = _read(out)
    assert shifted.shape[1] == song["samples"].shape[1]
    expected = 440.0 * 2 ** (semitones / 12)
    assert _peak_frequency(shifted[0, SR : 11 * SR]) == pytest.approx(expected, rel=0.002)


# At half speed R3's short window lets onsets drift early by up to ~a hop before it re-locks them: 13 ms with
# Rubber Band's own resampler, 16.5 ms with soxr's (one onset of 24; at 0.75x both within 1.2 ms).
@pytest.mark.parametrize(("quality", "late_ms", "pre_echo"), [("best", 15.0, 0.1), ("balanced", 20.0, 0.6)])
def test_transients_stay_on_time_and_sharp_with_the_finer_engine(song, tmp_path, quality, late_ms, pre_echo):
    out = tmp_path / "drums.wav"
    plan = _plan(song, {"vocals": 0.0, "bass": 0.0, "other": 0.0}, tempo=0.5, semitones=-2, quality=quality)
    render(plan, out)
    drums = _read(out)[0]
    onsets = _onsets(drums, 0.3 * np.max(np.abs(drums)), gap_s=0.5)
    expected = np.arange(0.0, 24.0, 1.0)  # a burst every 0.5 s, twice as slow
    assert len(onsets) == len(expected)
    assert np.max(np.abs(np.array(onsets) - expected)) < late_ms / 1000
    # Share of each burst's energy smeared into the 48 ms before it (the burst itself decays in 20 ms).
    before, around = round(0.05 * SR), round(0.002 * SR)
    smeared = [
        np.sum(drums[i - before : i - around] ** 2) / np.sum(drums[i - before : i + before] ** 2)
        for i in (round(at * SR) for at in expected[1:-1])
    ]
    assert np.mean(smeared) < pre_echo


def test_the_stereo_image_is_kept(tmp_path):
    left_only = np.stack([_tone(330, 6.0, 0.3), np.zeros(6 * SR)])
    centre = np.stack([_tone(550, 6.0, 0.2)] * 2)
    for name, samples in (("left", left_only), ("centre", centre)):
        sf.write(tmp_path / f"{name}.wav", samples.T, SR, subtype="FLOAT")
    sf.write(tmp_path / "audio.wav", (left_only + centre).T, SR, subtype="FLOAT")
    plan = MixPlan(
        stems=[(str(tmp_path / "left.wav"), 1.0)], original=str(tmp_path / "audio.wav"), tempo=0.8, semitones=3
    )
    render(plan, tmp_path / "left_out.wav")
    out = _read(tmp_path / "left_out.wav")
    assert _db(out[1], out[0]) < -80  # the left stays left
    plan = MixPlan(stems=[(str(tmp_path / "centre.wav"), 1.0)], original=str(tmp_path / "audio.wav"), tempo=1.2)
    render(plan, tmp_path / "centre_out.wav")
    out = _read(tmp_path / "centre_out.wav")
    assert _db(out[0] - out[1], out[0]) < -80  # the centre stays centre (mono-compatible)


def test_a_looped_section(song, tmp_path):
    out = tmp_path / "loop.wav"
    rendered = render(_plan(song, start=2.0, end=4.0, loops=3, tempo=0.8), out)
    assert rendered.frames == 3 * round(2 * SR / 0.8)
    mixed = _read(out)
    seam = round(2 * SR / 0.8)
    assert np.max(np.abs(mixed[:, seam - 3 : seam + 3])) < 0.02  # faded at the seam, no click


def test_the_click_track_lands_on_the_analysed_beats(tmp_path):
    quiet = np.stack([_tone(220, 8.0, 0.01)] * 2)
    sf.write(tmp_path / "bass.wav", quiet.T, SR, subtype="FLOAT")
    sf.write(tmp_path / "audio.wav", quiet.T, SR, subtype="FLOAT")
    beats = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    plan = MixPlan(
        stems=[(str(tmp_path / "bass.wav"), 1.0)],
        original=str(tmp_path / "audio.wav"),
        tempo=0.5,
        start=0.25,
        end=2.25,
        loops=2,
        click=True,
        beats=beats,
        downbeats=[0.5, 2.5],
    )
    render(plan, tmp_path / "click.wav")
    out = _read(tmp_path / "click.wav")
    onsets = _onsets(out[0], 0.1)
    # Beats 0.5-2.0 of the section from 0.25 s, twice as slow, and again 4 s later for the second loop.
    expected = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]
    assert np.allclose(onsets, expected, atol=0.002)
    peaks = [np.max(np.abs(out[0, round(t * SR) : round((t + 0.02) * SR)])) for t in expected]
    assert peaks[0] > peaks[1] * 1.2 and peaks[4] > peaks[5] * 1.2  # the downbeat is accented, every loop


def test_click_times_follow_section_tempo_and_loops():
    plan = MixPlan(stems=[], original="", tempo=0.5, loops=2, beats=[1.0, 2.0, 3.0], downbeats=[1.0])
    assert click_times(plan, 1.5, 3.5, 4.0) == [(1.0, False), (3.0, False), (5.0, False), (7.0, False)]


@pytest.mark.parametrize(
    ("fmt", "depth", "subtype"), [("flac", 16, "PCM_16"), ("wav", 24, "PCM_24"), ("mp3", None, "MPEG_LAYER_III")]
)
def test_formats_and_bit_depths(song, tmp_path, fmt, depth, subtype):
    out = tmp_path / f"mix.{fmt}"
    render(_plan(song, {"vocals": 0.0}, format=fmt, bit_depth=depth), out)
    info = sf.info(out)
    assert info.subtype == subtype
    assert info.samplerate == SR and info.channels == 2
    assert info.duration == pytest.approx(12.0, abs=0.1)


def test_a_section_past_the_end_is_refused(song, tmp_path):
    with pytest.raises(MixError) as refused:
        render(_plan(song, start=30.0, end=40.0), tmp_path / "none.wav")
    assert refused.value.code == "section_out_of_range"


def test_progress_is_reported_up_to_100(song, tmp_path):
    seen: list[float] = []
    render(_plan(song, tempo=0.9), tmp_path / "p.wav", seen.append)
    assert seen == sorted(seen) and seen[-1] == 100.0 and len(seen) >= 4


@pytest.fixture
def song48(song: dict[str, object]) -> dict[str, object]:
    """The song's stems as a job with `sample_rate` 48000 has them (resampled by the separator's soxr, HQ);
    its normalised audio stays at 44.1 kHz."""
    stems = song["stems"]
    assert isinstance(stems, dict)
    paths = {}
    for name, path in stems.items():
        samples, rate = sf.read(path, dtype="float32")
        paths[name] = str(Path(path).with_name(f"{name}-48k.wav"))
        sf.write(paths[name], soxr.resample(samples, rate, 48000, quality="HQ"), 48000, subtype="PCM_24")
    return dict(song, stems=paths)


def test_stems_at_48_khz_mix_at_48_khz_back_to_the_original(song48, tmp_path):
    out = tmp_path / "unity48.wav"
    rendered = render(_plan(song48, bit_depth=32), out)
    mixed, rate = sf.read(out, dtype="float64", always_2d=True)
    expected = soxr.resample(np.asarray(song48["samples"]).T, SR, 48000, quality="HQ")
    assert rate == rendered.sample_rate == 48000
    assert abs(mixed.shape[0] - expected.shape[0]) <= 1 and rendered.duration_s == pytest.approx(12.0, abs=1e-3)
    n = min(mixed.shape[0], expected.shape[0])
    assert _db((mixed[:n] - expected[:n]).T, expected[:n].T) < -60
    assert abs(rendered.gain_db) < 0.01  # loudness measured on the 44.1 kHz original matches the 48 kHz mix


def test_stems_at_48_khz_keep_their_pitch_tempo_and_section_times(song48, tmp_path):
    out = tmp_path / "slow48.wav"
    plan = _plan(song48, {"bass": 0.0, "drums": 0.0, "other": 0.0}, tempo=0.75, start=2.0, end=8.0)
    rendered = render(plan, out)
    slowed, rate = sf.read(out, dtype="float64", always_2d=True)
    assert rate == 48000 and rendered.frames == round(6.0 * 48000 / 0.75)
    spectrum = np.abs(np.fft.rfft(slowed[48000:-48000, 0] * np.hanning(slowed.shape[0] - 96000)))
    assert np.argmax(spectrum) * 48000 / (slowed.shape[0] - 96000) == pytest.approx(440.0, rel=0.003)


def test_the_click_lands_on_the_beats_of_48_khz_stems(tmp_path):
    quiet = np.stack([_tone(220, 8.0, 0.01)] * 2)
    sf.write(tmp_path / "audio.wav", quiet.T, SR, subtype="FLOAT")
    sf.write(tmp_path / "bass.wav", soxr.resample(quiet.T, SR, 48000), 48000, subtype="FLOAT")
    plan = MixPlan(
        stems=[(str(tmp_path / "bass.wav"), 1.0)],
        original=str(tmp_path / "audio.wav"),
        tempo=0.5,
        start=0.25,
        end=2.25,
        click=True,
        beats=[0.5, 1.0, 1.5, 2.0, 2.5],
        downbeats=[0.5],
    )
    render(plan, tmp_path / "click48.wav")
    out, rate = sf.read(tmp_path / "click48.wav", always_2d=True)
    assert rate == 48000 and out.shape[0] == 4 * 48000
    loud = np.flatnonzero(np.abs(out[:, 0]) > 0.1)
    onsets = np.concatenate([loud[:1], loud[1:][np.diff(loud) > 0.05 * 48000]])
    assert np.allclose(np.array(onsets) / 48000, [0.5, 1.5, 2.5, 3.5], atol=0.002)
