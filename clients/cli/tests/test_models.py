"""A submission's models and stem counts are checked against `/v1/models` before any upload."""

from __future__ import annotations

from typing import Any

import pytest

from stemflow_cli.errors import CliError, Exit
from stemflow_cli.models import check, resolve, separations


def model(name: str, stems: list[int], served: bool) -> dict[str, Any]:
    return {"name": name, "stems": stems, "served": served, "workers": int(served), "queue_depth": 0}


# As in the demo stack: only htdemucs is served.
CATALOGUE = {
    "models": [
        model("htdemucs", [2, 4], True),
        model("htdemucs_ft", [2, 4], False),
        model("htdemucs_6s", [2, 4, 6], False),
    ],
    "default_model": "htdemucs",
}


def refused(options: dict[str, Any], catalogue: dict[str, Any] = CATALOGUE) -> CliError:
    with pytest.raises(CliError) as raised:
        check(catalogue, options)
    return raised.value


@pytest.mark.parametrize(
    "options",
    [{}, {"stems": 2}, {"model": "htdemucs", "stems": 4}, {"targets": ["htdemucs:2", "htdemucs:4"]}],
)
def test_what_is_served_passes(options: dict[str, Any]) -> None:
    check(CATALOGUE, options)


def test_an_analysis_only_job_asks_for_no_model() -> None:
    assert separations({"separate": False, "model": "htdemucs_6s", "stems": 6}, "htdemucs") == []
    check(CATALOGUE, {"separate": False, "model": "nonesuch"})


def test_a_model_nothing_serves_is_refused_with_its_own_exit_code() -> None:
    error = refused({"model": "htdemucs_ft"})
    assert error.exit_code == Exit.MODEL_UNAVAILABLE == 10
    assert "no worker serves htdemucs_ft now" in error.message and "served now: htdemucs" in error.hint
    target = refused({"targets": ["htdemucs:4", "htdemucs_ft:2"]})
    assert target.exit_code == Exit.MODEL_UNAVAILABLE and "--target htdemucs_ft:2" in target.message
    nothing = {"models": [model("htdemucs", [2, 4], False)], "default_model": "htdemucs"}
    assert "no model is served now" in refused({}, nothing).hint


def test_six_stems_from_a_four_source_model_names_the_model_that_gives_six() -> None:
    error = refused({"stems": 6})
    assert error.exit_code == Exit.REJECTED
    assert error.message == "htdemucs (the default model) cannot give 6 stems: it gives 2 or 4 stems"
    assert error.hint == "use --model htdemucs_6s --stems 6 once a worker serves htdemucs_6s (none does now)"
    served_6s = {**CATALOGUE, "models": [*CATALOGUE["models"][:2], model("htdemucs_6s", [2, 4, 6], True)]}
    assert refused({"model": "htdemucs", "stems": 6}, served_6s).hint == "use --model htdemucs_6s --stems 6"
    assert refused({"targets": ["htdemucs:6"]}, served_6s).hint == "use --target htdemucs_6s:6"


def test_an_unknown_model_lists_the_models() -> None:
    error = refused({"targets": ["demucs:4"]})
    assert error.exit_code == Exit.REJECTED
    assert "there is no model demucs" in error.message and "htdemucs, htdemucs_ft, htdemucs_6s" in error.message


def test_six_stems_alone_pick_the_six_source_model_served_ones_first() -> None:
    options, chosen = resolve(CATALOGUE, {"stems": 6})
    assert options == {"stems": 6, "model": "htdemucs_6s"} and chosen == "6 stems: using the model htdemucs_6s"
    # Not served in this catalogue: refused before upload, naming the model that would give them.
    error = refused(options)
    assert error.exit_code == Exit.MODEL_UNAVAILABLE and "htdemucs_6s" in error.message
    served = {**CATALOGUE, "models": [*CATALOGUE["models"][:2], model("htdemucs_6s", [2, 4, 6], True)]}
    check(served, resolve(served, {"stems": 6})[0])
    # What was named, or what the default gives, is left alone.
    for asked in ({"stems": 4}, {"stems": 6, "model": "htdemucs"}, {"targets": ["htdemucs:4"], "stems": 6}):
        assert resolve(CATALOGUE, asked) == (asked, None)
    # No catalogue (a gateway without /v1/models): the six-source model all the same.
    assert resolve(None, {"stems": 6})[0]["model"] == "htdemucs_6s"
    assert resolve(None, {"stems": 2}) == ({"stems": 2}, None)
