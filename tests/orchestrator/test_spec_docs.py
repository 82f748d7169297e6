"""docs/job-spec.md is exactly what the spec models generate, and every field is described."""
from __future__ import annotations

from pathlib import Path

from orchestrator import spec_docs

PAGE = Path(__file__).resolve().parents[2] / "docs" / "job-spec.md"


def test_committed_page_matches_the_models():
    assert PAGE.read_text() == spec_docs.render(), (
        f"docs/job-spec.md is stale: regenerate it with `{spec_docs.COMMAND}` (from the repository root)")


def test_every_spec_field_has_a_description():
    assert spec_docs.undescribed_fields() == [], "give these fields a description= (it is their row in docs/job-spec.md)"


def test_every_section_and_kind_has_a_table():
    text = spec_docs.render()
    for heading in ("## kind: pretrain", "## kind: finetune", "## kind: deploy", "## kind: pipeline",
                    "### stage kind: finetune", "## train", "## cluster", "## tracking", "## model", "## debug"):
        assert f"\n{heading}\n" in text
    # a section's row links to its table, and finetune's own train defaults are shown
    assert "| `train` | [train](#train) | lr: 0.0001" in text
    assert "| `zero_stage` | `0` / `1` / `2` / `3` | `2` |" in text
