"""The event contract: CloudEvents 1.0 envelope and the v1 event data models.

Every service imports its event types from here; nothing else defines a
routing key or an event type string.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
TYPE_PREFIX = "stemflow."
TYPE_SUFFIX = ".v1"
_EVENT_ID_NAMESPACE = uuid.UUID("5b0c36c2-4a7e-4c62-9a55-1f3d1e7a0c11")


class _Data(BaseModel):
    """Base of event payloads: tolerant readers, so producers can add optional fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# --- shared pieces -----------------------------------------------------------

Model = Literal["htdemucs", "htdemucs_ft", "htdemucs_6s"]
Quality = Literal["fast", "balanced", "best"]
OutputFormat = Literal["wav", "flac", "mp3"]
# The media type of each output format, for stems and mixes alike.
MEDIA_TYPES: dict[str, str] = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}
Priority = Literal["normal", "high"]
JobStatus = Literal["queued", "ingesting", "processing", "completed", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "completed", "failed", "skipped"]

TERMINAL_JOB_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
SIX_STEM_MODELS: frozenset[str] = frozenset({"htdemucs_6s"})


MAX_TARGETS = 4
# Trims beyond a day are no song's; bounded so that no worker meets an overflow (1e308 * 44100 = inf).
MAX_TRIM_S = 24 * 3600.0
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_http_url(url: str, field: str) -> str:
    """An http(s) URL parsed strictly: a host name or IP literal, a valid port, no credentials, no controls.

    Raises ValueError with a message that says what to fix (pydantic turns it into a 422 field error).
    """
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise ValueError(f"{field} must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of 0-65535 or not a number
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"{field} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must start with http:// or https://")
    if not host:
        raise ValueError(f"{field} needs a host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{field} must not carry a user name or password")
    if port == 0:
        raise ValueError(f"{field} has port 0, which no server listens on")
    netloc_host = parts.netloc.rsplit("@", 1)[-1]
    if netloc_host.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{field} has an invalid IPv6 address [{host}]") from None
    else:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{field} has an invalid host name") from None
        if len(ascii_host) > 253 or not all(
            _HOST_LABEL.fullmatch(label) for label in ascii_host.rstrip(".").split(".")
        ):
            raise ValueError(f"{field} has an invalid host name")
    return url


def _int_from_text(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class Target(_Data):
    """One separation of a job's audio: a model and a stem set (`targets` asks for several)."""

    model: Model
    stems: Literal[2, 4, 6] = 4

    @field_validator("stems", mode="before")
    @classmethod
    def _stems_from_text(cls, value: Any) -> Any:
        return _int_from_text(value)

    @model_validator(mode="after")
    def _consistent(self) -> Target:
        if self.stems == 6 and self.model not in SIX_STEM_MODELS:
            raise ValueError(f"stems=6 needs a six-source model ({', '.join(sorted(SIX_STEM_MODELS))})")
        return self

    @property
    def name(self) -> str:
        """Its stable name in job documents, events and URLs, e.g. `htdemucs_6s-6`."""
        return f"{self.model}-{self.stems}"


@dataclass(frozen=True)
class Shaping:
    """Every job option says whether it changes what the stages produce (`shapes`), and if not, why.

    Finished results are reused for the same audio only when every shaping option matches
    (stemflow_shared.reuse); a test fails on an option declared without this marker.
    """

    shapes: bool
    why: str = ""


SHAPES = Shaping(True)


class JobOptions(_Data):
    """What the client asked for; validated the same way at the gateway and in every consumer."""

    stems: Annotated[Literal[2, 4, 6], SHAPES] = 4
    model: Annotated[Model, SHAPES] = "htdemucs"
    quality: Annotated[Quality, SHAPES] = "balanced"
    output_format: Annotated[OutputFormat, SHAPES] = "wav"
    trim_start: Annotated[float | None, Shaping(False, "the fingerprint is of the trimmed audio")] = Field(
        default=None, ge=0, le=MAX_TRIM_S, allow_inf_nan=False
    )
    trim_end: Annotated[float | None, Shaping(False, "the fingerprint is of the trimmed audio")] = Field(
        default=None, gt=0, le=MAX_TRIM_S, allow_inf_nan=False
    )
    analyze: Annotated[bool, SHAPES] = True
    separate: Annotated[bool, SHAPES] = True
    callback_url: Annotated[str | None, Shaping(False, "where the outcome is told, not what it is")] = Field(
        default=None, max_length=2048
    )
    priority: Annotated[Priority, Shaping(False, "when the work runs, not what it makes")] = "normal"
    # Also deliver `residual` (mix minus the other stems), so the stems sum exactly to the input.
    residual: Annotated[bool, SHAPES] = False
    # Several separations of the one upload (each with its own status and result); the first is the
    # primary one, mirrored in `model` and `stems`. Empty: the one separation `model` and `stems` name.
    targets: Annotated[list[Target], SHAPES] = Field(default_factory=list, max_length=MAX_TARGETS)
    # The stems' sample format (WAV and FLAC only): 16- or 24-bit integers, or 32 = 32-bit float (WAV; "float"
    # is taken for it). None: the source's integer depth when it is 16, else 24.
    bit_depth: Annotated[Literal[16, 24, 32] | None, SHAPES] = None
    # The stems' sample rate (WAV and FLAC only), resampled from the model's; None: the model's (44100).
    sample_rate: Annotated[Literal[44100, 48000, 88200, 96000] | None, SHAPES] = None

    @classmethod
    def shaping_fields(cls) -> tuple[str, ...]:
        """The options that change what the stages produce, from their declarations."""
        return tuple(name for name, field in cls.model_fields.items() if _shaping_of(field.metadata).shapes)

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_from_text(cls, value: Any) -> Any:
        # A form field: "htdemucs:4,htdemucs_6s:6"; JSON may also give "model:stems" strings.
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            return [_target_from_text(item) if isinstance(item, str) else item for item in value]
        return value

    # Form fields arrive as text; a Literal of ints would otherwise refuse "4".
    @field_validator("stems", mode="before")
    @classmethod
    def _stems_from_text(cls, value: Any) -> Any:
        return _int_from_text(value)

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _rate_from_text(cls, value: Any) -> Any:
        return _int_from_text(value)

    @field_validator("bit_depth", mode="before")
    @classmethod
    def _depth_from_text(cls, value: Any) -> Any:
        return 32 if isinstance(value, str) and value.strip().lower() == "float" else _int_from_text(value)

    @field_validator("callback_url")
    @classmethod
    def _http_callback(cls, value: str | None) -> str | None:
        # Where it may point (public addresses only) is checked when it is called; the form, here.
        return None if value is None else check_http_url(value, "callback_url")

    @model_validator(mode="after")
    def _consistent(self) -> JobOptions:
        if self.output_format == "mp3" and (self.bit_depth is not None or self.sample_rate is not None):
            raise ValueError("bit_depth and sample_rate apply to wav and flac, not mp3")
        if self.output_format == "flac" and self.bit_depth == 32:
            raise ValueError("flac has no float samples: bit_depth 16 or 24 (or wav for 32-bit float)")
        if self.trim_start is not None and self.trim_end is not None and self.trim_end <= self.trim_start:
            raise ValueError("trim_end must be greater than trim_start")
        if self.stems == 6 and self.model not in SIX_STEM_MODELS:
            raise ValueError(f"stems=6 needs a six-source model ({', '.join(sorted(SIX_STEM_MODELS))})")
        if not (self.analyze or self.separate):
            raise ValueError("at least one of analyze and separate must be true")
        if self.targets:
            names = [t.name for t in self.targets]
            if len(set(names)) != len(names):
                raise ValueError("targets must differ from each other")
            primary = self.targets[0]
            # The primary target is what `model` and `stems` say, for clients that know only those.
            object.__setattr__(self, "model", primary.model)
            object.__setattr__(self, "stems", primary.stems)
        return self

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def for_target(self, target: Target) -> JobOptions:
        """These options narrowed to one target (what that target's separation work carries)."""
        return self.model_copy(update={"model": target.model, "stems": target.stems, "targets": []})


def _shaping_of(metadata: list[Any]) -> Shaping:
    found = [m for m in metadata if isinstance(m, Shaping)]
    if len(found) != 1:
        raise TypeError("every job option is declared with one Shaping marker")
    return found[0]


def _target_from_text(text: str) -> dict[str, Any]:
    model, _, stems = text.strip().partition(":")
    return {"model": model.strip(), "stems": stems.strip() or 4}


class ErrorInfo(_Data):
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(default="", max_length=2000)


class InputRef(_Data):
    """Where the job's audio comes from: an uploaded blob or a URL to fetch."""

    blob_key: str | None = None
    source_url: str | None = Field(default=None, max_length=2048)
    filename: str | None = Field(default=None, max_length=255)
    content_type: str | None = None
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = None

    @field_validator("source_url")
    @classmethod
    def _http_source(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "source_url")

    @model_validator(mode="after")
    def _one_source(self) -> InputRef:
        if (self.blob_key is None) == (self.source_url is None):
            raise ValueError("exactly one of blob_key and source_url is required")
        return self


class AudioInfo(_Data):
    """The normalised audio every worker reads (44.1 kHz, stereo, float32 WAV)."""

    blob_key: str
    duration_s: float = Field(gt=0)
    sample_rate: int = Field(gt=0)
    channels: int = Field(gt=0)
    frames: int = Field(gt=0)
    fingerprint: str


class SourceInfo(_Data):
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    # The source's integer bit depth (16 or 24) when it had one; stems keep it where the format allows.
    bits_per_sample: int | None = None


class StemInfo(_Data):
    name: str
    format: OutputFormat
    media_type: str
    blob_key: str
    size: int = Field(ge=0)
    duration_s: float = Field(ge=0)


class TempoAlternative(_Data):
    bpm: float
    confidence: float


class KeyAlternative(_Data):
    key: str
    confidence: float


class ChordSegment(_Data):
    """A chord from `start` to `end` (s): `root` spelled for the key ("E♭"), None for no chord; `quality` is
    Harte's shorthand (maj, min, 7, maj7, min7, dim, sus4, or N); `label` as a lead sheet writes it ("E♭m7")."""

    start: float
    end: float
    label: str
    root: str | None = None
    quality: str = "N"
    confidence: float = 0.0


class AnalysisResult(_Data):
    tempo_bpm: float
    tempo_confidence: float
    key: str
    key_confidence: float
    loudness_lufs: float
    true_peak_dbfs: float
    rms_dbfs: float
    duration_s: float
    beat_count: int
    beats: list[float] = Field(default_factory=list)
    energy: list[float] = Field(default_factory=list)
    energy_hop_s: float = 0.1
    source: Literal["mix", "stems"] = "mix"
    # Stated doubt: the runner-up readings, best first (the chosen one is not repeated).
    tempo_alternatives: list[TempoAlternative] = Field(default_factory=list)
    key_alternatives: list[KeyAlternative] = Field(default_factory=list)
    downbeats: list[float] = Field(default_factory=list)
    meter: int | None = None
    # Beat-synchronous chord timeline; the key's codes on DJs' Camelot wheel ("5B") and in Open Key ("10d").
    chords: list[ChordSegment] = Field(default_factory=list)
    key_camelot: str | None = None
    key_open_key: str | None = None
    # With `source` "stems": what each fact was read from ("rhythm", "key", "chords" to "mix", "stems" or
    # "mix+stems"); empty for an analysis of the mix alone.
    sources: dict[str, Literal["mix", "stems", "mix+stems"]] = Field(default_factory=dict)


class StageProgress(_Data):
    status: StageStatus = "pending"
    percent: float = Field(default=0.0, ge=0, le=100)


class Progress(_Data):
    overall: float = Field(default=0.0, ge=0, le=100)
    ingest: StageProgress = StageProgress()
    separation: StageProgress = StageProgress()
    analysis: StageProgress = StageProgress()
    # Per separation target, for jobs with `targets` (the separation stage aggregates them).
    targets: dict[str, StageProgress] = Field(default_factory=dict)


# --- event payloads ------------------------------------------------------------


JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JobEvent(_Data):
    job_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class JobSubmitted(JobEvent):
    owner: str = Field(min_length=1)
    options: JobOptions = JobOptions()
    input: InputRef


class AudioIngested(JobEvent):
    owner: str
    options: JobOptions
    audio: AudioInfo
    source: SourceInfo
    # True when ingest found finished results for the same audio and options and publishes them itself.
    reused: bool = False
    # For a job with several targets ingest publishes one of these per target (options narrowed to it, so
    # the work routes to that model's separators); only the primary target's copy is analysed.
    target: str | None = None
    primary: bool = True


class StageFailed(JobEvent):
    error: ErrorInfo
    # separation.failed of one target of a job with several (the others carry on).
    target: str | None = None


class SeparationProgress(JobEvent):
    percent: float = Field(ge=0, le=100)
    target: str | None = None


class SeparationCompleted(JobEvent):
    target: str | None = None
    model: str
    device: str
    precision: str
    untrained: bool = False
    stems: list[StemInfo]
    # How far the model's own stems are from summing to the mix (dB, relative to the mix).
    reconstruction_error_db: float | None = None


class AnalysisCompleted(JobEvent):
    analysis: AnalysisResult


class AnalysisRequested(JobEvent):
    """The gateway's request, once a job that separates has its stems: read the facts from them and the mix."""

    audio: AudioInfo
    stems: list[StemInfo]


class _OwnedJobEvent(JobEvent):
    owner: str
    # The batch the job belongs to (POST /v1/batches), so clients can follow a whole batch.
    batch_id: str | None = None


class JobProgressed(_OwnedJobEvent):
    status: JobStatus
    progress: Progress


class JobCompleted(_OwnedJobEvent):
    stems: list[StemInfo] = Field(default_factory=list)
    analysis: AnalysisResult | None = None
    # Some targets of a job with several failed (their errors are in the job document).
    partial: bool = False


class JobFailed(_OwnedJobEvent):
    error: ErrorInfo


class JobCancelled(_OwnedJobEvent):
    pass


# --- practice mixes ------------------------------------------------------------

MixPreset = Literal["karaoke", "instrumental", "a_cappella", "drumless", "bassless", "bass_up"]
MixQuality = Literal["fast", "balanced", "best"]
MixStatus = Literal["queued", "running", "completed", "failed"]
MIX_ID = re.compile(r"[0-9a-f]{24}")
MAX_MIX_GAIN = 4.0
MAX_MIX_LOOPS = 16
MAX_PITCH_SEMITONES = 12
# The bit depths each format can be written with (32: float WAV); MP3 has none.
MIX_BIT_DEPTHS: dict[str, tuple[int, ...]] = {"wav": (16, 24, 32), "flac": (16, 24), "mp3": ()}
_STEM_NAME = r"^[A-Za-z0-9_-]{1,32}$"
StemName = Annotated[str, Field(pattern=_STEM_NAME)]


class MixOptions(_Data):
    """A practice mix as a client asks for it: which stems at what gain, tempo, pitch, section, click, format."""

    preset: MixPreset | None = None
    # Linear gain per stem (1 = as separated, 0 = muted), applied over the preset.
    gains: dict[StemName, Annotated[float, Field(ge=0, le=MAX_MIX_GAIN, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=16
    )
    mute: list[StemName] = Field(default_factory=list, max_length=16)
    solo: list[StemName] = Field(default_factory=list, max_length=16)
    target: str | None = Field(default=None, max_length=64)
    tempo: float = Field(default=1.0, ge=0.5, le=1.5, allow_inf_nan=False)
    semitones: int = Field(default=0, ge=-MAX_PITCH_SEMITONES, le=MAX_PITCH_SEMITONES)
    cents: float = Field(default=0.0, ge=-100, le=100, allow_inf_nan=False)
    start: float | None = Field(default=None, ge=0, le=MAX_TRIM_S, allow_inf_nan=False)
    end: float | None = Field(default=None, gt=0, le=MAX_TRIM_S, allow_inf_nan=False)
    loops: int = Field(default=1, ge=1, le=MAX_MIX_LOOPS)
    click: bool = False
    format: OutputFormat = "wav"
    bit_depth: Literal[16, 24, 32] | None = None
    quality: MixQuality = "balanced"

    @model_validator(mode="after")
    def _consistent(self) -> MixOptions:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be greater than start")
        if abs(self.pitch_semitones) > MAX_PITCH_SEMITONES:
            raise ValueError("semitones and cents together must stay within 12 semitones")
        if self.bit_depth is not None and self.bit_depth not in MIX_BIT_DEPTHS[self.format]:
            allowed = ", ".join(map(str, MIX_BIT_DEPTHS[self.format])) or "none: leave it out"
            raise ValueError(f"bit_depth {self.bit_depth} is not available for {self.format} (allowed: {allowed})")
        return self

    @property
    def pitch_semitones(self) -> float:
        return self.semitones + self.cents / 100.0

    @property
    def resolved_bit_depth(self) -> int | None:
        """The bit depth the file is written with (24 for WAV and FLAC unless asked; none for MP3)."""
        return None if self.format == "mp3" else (self.bit_depth or 24)


class MixStem(_Data):
    """One stem of a mix as the worker reads it: where it is and its gain (presets, mutes and solos applied)."""

    name: str
    blob_key: str
    gain: float = Field(ge=0, le=MAX_MIX_GAIN)


class MixFile(_Data):
    """A rendered mix file."""

    blob_key: str
    format: OutputFormat
    media_type: str
    size: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    sample_rate: int
    bit_depth: int | None = None
    # The mix's integrated loudness (matched to the original's over the same section) and the gain that did it.
    loudness_lufs: float | None = None
    gain_db: float = 0.0
    render_s: float = 0.0


class _MixEvent(JobEvent):
    mix_id: str = Field(pattern=r"^[0-9a-f]{24}$")


class MixRequested(_MixEvent):
    owner: str
    options: MixOptions
    stems: list[MixStem] = Field(min_length=1)
    # The normalised audio the stems came from: the mix's loudness is matched to it over the same section.
    audio_key: str
    beats: list[float] = Field(default_factory=list)
    downbeats: list[float] = Field(default_factory=list)
    output_key: str
    # Counts requests of the same mix (a failed mix asked again is rendered again under a new event id).
    attempt: int = Field(default=1, ge=1)


class MixProgress(_MixEvent):
    percent: float = Field(ge=0, le=100)


class MixCompleted(_MixEvent):
    file: MixFile


class MixFailed(_MixEvent):
    error: ErrorInfo


class MixState(_Data):
    """A mix as clients see it (`GET /v1/jobs/{id}/mixes/{mix_id}` without the options; `path` to download it)."""

    id: str
    status: MixStatus
    percent: float = Field(default=0.0, ge=0, le=100)
    error: ErrorInfo | None = None
    format: OutputFormat | None = None
    size: int | None = None
    duration_s: float | None = None
    path: str | None = None


class JobMixChanged(_OwnedJobEvent):
    mix: MixState


# --- the registry --------------------------------------------------------------

D = TypeVar("D", bound=_Data)


@dataclass(frozen=True)
class EventSpec(Generic[D]):
    """One event of the contract: its name (also the routing key) and payload model."""

    name: str
    data_model: type[D]

    @property
    def type(self) -> str:
        return f"{TYPE_PREFIX}{self.name}{TYPE_SUFFIX}"

    @property
    def routing_key(self) -> str:
        return self.name


JOB_SUBMITTED = EventSpec("job.submitted", JobSubmitted)
AUDIO_INGESTED = EventSpec("audio.ingested", AudioIngested)
INGEST_FAILED = EventSpec("ingest.failed", StageFailed)
SEPARATION_PROGRESS = EventSpec("separation.progress", SeparationProgress)
SEPARATION_COMPLETED = EventSpec("separation.completed", SeparationCompleted)
SEPARATION_FAILED = EventSpec("separation.failed", StageFailed)
ANALYSIS_COMPLETED = EventSpec("analysis.completed", AnalysisCompleted)
ANALYSIS_FAILED = EventSpec("analysis.failed", StageFailed)
ANALYSIS_REQUESTED = EventSpec("analysis.requested", AnalysisRequested)
JOB_PROGRESS = EventSpec("job.progress", JobProgressed)
JOB_COMPLETED = EventSpec("job.completed", JobCompleted)
JOB_FAILED = EventSpec("job.failed", JobFailed)
JOB_CANCELLED = EventSpec("job.cancelled", JobCancelled)
MIX_REQUESTED = EventSpec("mix.requested", MixRequested)
MIX_PROGRESS = EventSpec("mix.progress", MixProgress)
MIX_COMPLETED = EventSpec("mix.completed", MixCompleted)
MIX_FAILED = EventSpec("mix.failed", MixFailed)
JOB_MIX_PROGRESS = EventSpec("job.mix.progress", JobMixChanged)
JOB_MIX_COMPLETED = EventSpec("job.mix.completed", JobMixChanged)
JOB_MIX_FAILED = EventSpec("job.mix.failed", JobMixChanged)

ALL_EVENTS: tuple[EventSpec[Any], ...] = (
    JOB_SUBMITTED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    SEPARATION_PROGRESS,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    JOB_PROGRESS,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELLED,
    MIX_REQUESTED,
    MIX_PROGRESS,
    MIX_COMPLETED,
    MIX_FAILED,
    JOB_MIX_PROGRESS,
    JOB_MIX_COMPLETED,
    JOB_MIX_FAILED,
)
TERMINAL_JOB_EVENTS: tuple[EventSpec[Any], ...] = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED)
SPECS_BY_TYPE: dict[str, EventSpec[Any]] = {spec.type: spec for spec in ALL_EVENTS}


# --- the envelope ---------------------------------------------------------------


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 structured-mode JSON envelope."""

    # CloudEvents allows extension attributes; they are kept, not rejected.
    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str = "application/json"
    data: dict[str, Any]

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Event(Generic[D]):
    """An envelope together with its validated, typed payload."""

    __slots__ = ("data", "envelope", "spec")

    def __init__(self, envelope: CloudEvent, spec: EventSpec[D], data: D) -> None:
        self.envelope = envelope
        self.spec = spec
        self.data = data

    @property
    def id(self) -> str:
        return self.envelope.id

    def __repr__(self) -> str:
        return f"Event({self.spec.name}, id={self.id}, subject={self.envelope.subject})"


class EventError(Exception):
    """An event that cannot be accepted; `code` says why (dead-letter reason)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def event_id(*parts: str) -> str:
    """A deterministic event id, so a redelivered handler republishes the same event."""
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, "/".join(parts)))


def make_event(
    spec: EventSpec[D], data: D, *, source: str, subject: str | None = None, id: str | None = None
) -> Event[D]:
    """Build an outgoing event; the subject defaults to the payload's job id."""
    if not isinstance(data, spec.data_model):
        raise TypeError(f"{spec.name} needs {spec.data_model.__name__}, got {type(data).__name__}")
    envelope = CloudEvent(
        specversion=SPEC_VERSION,
        id=id or str(uuid.uuid4()),
        source=source,
        type=spec.type,
        time=datetime.now(UTC),
        subject=subject if subject is not None else getattr(data, "job_id", None),
        data=data.model_dump(mode="json"),
    )
    return Event(envelope, spec, data)


def parse_event(body: bytes | str | dict[str, Any]) -> Event[Any]:
    """Validate an envelope and its payload; raise EventError with a dead-letter reason."""
    try:
        raw = json.loads(body) if isinstance(body, bytes | str) else body
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError("malformed_json", str(exc)[:300]) from exc
    if not isinstance(raw, dict):
        raise EventError("invalid_envelope", "the body is not a JSON object")
    try:
        envelope = CloudEvent.model_validate(raw)
    except ValidationError as exc:
        raise EventError("invalid_envelope", _summary(exc)) from exc
    spec = SPECS_BY_TYPE.get(envelope.type)
    if spec is None:
        kind = "unsupported_version" if envelope.type.startswith(TYPE_PREFIX) else "unknown_type"
        raise EventError(kind, f"type {envelope.type!r} is not part of the v1 contract")
    try:
        data = spec.data_model.model_validate(envelope.data)
    except ValidationError as exc:
        raise EventError("invalid_data", _summary(exc)) from exc
    return Event(envelope, spec, data)


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]]
    return "; ".join(parts)[:500]


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every event payload, keyed by CloudEvents type."""
    return {spec.type: spec.data_model.model_json_schema() for spec in ALL_EVENTS}
