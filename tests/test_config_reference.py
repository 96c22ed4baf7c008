"""The configuration reference (docs/configuration.md) is the schema: it is exactly what
`python -m common.config_reference --write` makes from common/config.py and the methods'
settings models, it has a row for every run-config key, and no setting lacks a description."""

from __future__ import annotations

from pydantic import BaseModel, Field

from common import config_reference
from common.config import leaf_keys, method_sections


def test_the_page_is_what_the_schema_generates():
    on_disk = config_reference.PAGE.read_text()
    assert on_disk == config_reference.render(), (
        f"docs/configuration.md is stale: run {config_reference.COMMAND}"
    )


def test_every_setting_has_a_description():
    assert config_reference.undocumented() == []


def test_every_run_config_key_has_a_row():
    page = config_reference.PAGE.read_text()
    assert sorted(config_reference.settings_keys()) == sorted(leaf_keys())
    assert [key for key in leaf_keys() if f"| `{key}` |" not in page] == []


def test_a_setting_added_without_a_description_fails(monkeypatch):
    """What happens to the next key someone adds: the check names it, the page cannot be
    written, and the command exits non-zero."""

    class Extra(BaseModel):
        knob: int = 3
        dial: float = Field(0.5, description="documented")

    monkeypatch.setattr(
        config_reference, "method_sections", lambda: {**method_sections(), "extra": Extra}
    )
    assert config_reference.undocumented() == ["extra.knob"]
    try:
        config_reference.render()
    except config_reference.UndocumentedSetting as err:
        assert "extra.knob" in str(err)
    else:
        raise AssertionError("render() accepted a setting without a description")
    assert config_reference.main(["--write"]) == 1


def test_the_check_command_passes_on_the_shipped_page(capsys):
    assert config_reference.main([]) == 0
    assert "up to date" in capsys.readouterr().out
