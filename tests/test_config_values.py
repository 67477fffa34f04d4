"""Error lines stay one bounded line whatever the value: check_zone and format_validation_error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import BufferSettings, ValidateSettings, check_zone, format_validation_error


def test_a_zone_name_too_long_for_the_file_system_is_a_value_error() -> None:
    # ZoneInfo looks the name up as a file: 100,000 characters raised OSError (ENAMETOOLONG), a traceback.
    with pytest.raises(ValueError, match=r"expected an IANA time zone .*\.\.\. \(100,000 characters\)$") as info:
        check_zone("x" * 100_000)
    assert len(str(info.value)) < 300


def test_a_hostile_zone_in_settings_is_one_short_line() -> None:
    with pytest.raises(ValidationError) as info:
        ValidateSettings(default_timezone="Europe/" + "x" * 100_000)
    message = format_validation_error("s.yaml", info.value)
    assert message.startswith("s.yaml: default_timezone: expected an IANA time zone")
    assert "\n" not in message and len(message) < 800


def test_a_long_input_is_quoted_bounded() -> None:
    with pytest.raises(ValidationError) as info:
        BufferSettings.model_validate({"lock": "y" * 10_000})
    message = format_validation_error("s.yaml", info.value)
    assert message.endswith("... (10,002 characters))")
    assert len(message) < 400
