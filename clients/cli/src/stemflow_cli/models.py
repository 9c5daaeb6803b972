"""What the service runs now (`GET /v1/models`): a submission's models and stem counts checked before any upload."""

from __future__ import annotations

from typing import Any

from .errors import CliError, Exit

SIX_SOURCE_MODEL = "htdemucs_6s"
_LIST_HINT = "`stemflow models` lists the models, their stem counts and whether a worker serves them now"


def separations(options: dict[str, Any], default_model: str) -> list[tuple[str, int | None, str]]:
    """(model, stems or None for the server's default, what to call it) for each separation the options ask."""
    if options.get("separate") is False:
        return []
    if options.get("targets"):
        asked: list[tuple[str, int | None, str]] = []
        for target in options["targets"]:
            model, _, stems = target.partition(":")
            asked.append((model, int(stems), f"{model} (--target {target})"))
        return asked
    model = options.get("model") or default_model
    return [(model, options.get("stems"), model if options.get("model") else f"{model} (the default model)")]


def resolve(catalogue: dict[str, Any] | None, options: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The options with a model that gives the stems asked, when no model was named and the default cannot
    (`--stems 6`: the six-source model, as the web page offers it), and what was chosen; served models first.

    Without a catalogue (a gateway without /v1/models), six stems come from the six-source model."""
    stems = options.get("stems")
    if options.get("model") or options.get("targets") or options.get("separate") is False or stems is None:
        return options, None
    if catalogue is None:
        if stems != 6:
            return options, None
        able = [SIX_SOURCE_MODEL]
    else:
        models = {m["name"]: m for m in catalogue.get("models", [])}
        default = models.get(str(catalogue.get("default_model") or "htdemucs")) or {}
        if stems in default.get("stems", []):
            return options, None
        able = [name for name, m in models.items() if stems in m.get("stems", [])]
        able.sort(key=lambda name: not models[name].get("served"))
    if not able:
        return options, None
    return {**options, "model": able[0]}, f"{stems} stems: using the model {able[0]}"


def check(catalogue: dict[str, Any], options: dict[str, Any]) -> None:
    """Raise a `CliError` for a model that does not exist, cannot give the stems asked, or nothing serves now."""
    models = {m["name"]: m for m in catalogue.get("models", [])}
    default = str(catalogue.get("default_model") or "htdemucs")
    for model, stems, label in separations(options, default):
        info = models.get(model)
        if info is None:
            raise CliError(
                f"there is no model {label}; the models are {', '.join(models) or 'none'}",
                Exit.REJECTED,
                hint=_LIST_HINT,
            )
        if stems is not None and stems not in info.get("stems", []):
            raise CliError(
                f"{label} cannot give {stems} stems: it gives {_counts(info)}",
                Exit.REJECTED,
                hint=_other_model(models, stems, target="--target" in label),
            )
        if not info.get("served"):
            served = ", ".join(name for name, m in models.items() if m.get("served"))
            raise CliError(
                f"no worker serves {label} now",
                Exit.MODEL_UNAVAILABLE,
                hint=f"served now: {served}; or retry later" if served else "no model is served now: retry later",
            )


def _counts(info: dict[str, Any]) -> str:
    counts = [str(n) for n in info.get("stems", [])]
    return " or ".join(counts) + " stems" if counts else "no stems"


def _other_model(models: dict[str, Any], stems: int, *, target: bool) -> str:
    """Where these stems can come from: a served model first, else one that gives them when it is served."""
    able = [name for name, m in models.items() if stems in m.get("stems", [])]
    if not able:
        return f"no model gives {stems} stems"
    served = [name for name in able if models[name].get("served")]
    name = (served or able)[0]
    use = f"--target {name}:{stems}" if target else f"--model {name} --stems {stems}"
    return f"use {use}" + ("" if served else f" once a worker serves {name} (none does now)")
