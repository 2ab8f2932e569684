"""docs/configuration.md and ``--help`` list every config key as the code declares it."""

import dataclasses
from pathlib import Path

from kvpo.training.config import TrainConfig
from kvpo.training.config_doc import markdown
from kvpo.training.config_parse import all_keys, choices, help_text

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _leaf_keys():
    nested = {f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(
        f.default_factory() if f.default is dataclasses.MISSING else f.default)}  # fmt: skip
    return [k for k in all_keys() if k not in nested]


def test_configuration_page_is_generated_from_the_code():
    assert PAGE.read_text() == markdown(), (
        "docs/configuration.md is stale: python -m kvpo.training.config_doc > docs/configuration.md"
    )


def test_every_key_and_choice_is_documented():
    page, text = PAGE.read_text(), help_text()
    keys = _leaf_keys()
    assert len(keys) > 70 and "adapter.rank" in keys and "gated_scale" in keys
    for key in keys:
        assert f"| `{key}` |" in page, key
        assert f"  {key} (" in text, key
    for key, allowed in choices().items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert "choices: " + ", ".join(f"`{c}`" for c in allowed) in row
