"""Model cards: kept in the datasets row, parsed for intended use, limitations and licence."""

from __future__ import annotations

from catalog.model_card import parse_model_card
from factory.models import model_card_markdown


def test_default_model_card_states_intended_use_limitations_and_licence():
    card = parse_model_card(model_card_markdown("default"))
    assert card.title.startswith("ctfactory `default` model")
    assert card.intended_use.startswith("Running the factory") and "smoke tests" in card.intended_use
    assert card.limitations.startswith("Anything that needs realistic CT")
    assert "Apache-2.0" in card.licence


def test_sections_are_read_and_missing_parts_stay_empty():
    text = ("# My model\n\nIntro.\n\n## Intended use\n\nSegmentation pre-training.\n\n```\n# not a heading\n```\n"
            "## Limitations\n\nAdults only.\nNo contrast phases.\n\n## Other\n\nx\n")
    card = parse_model_card(text)
    assert (card.title, card.intended_use) == ("My model", "Segmentation pre-training.\n\n```\n# not a heading\n```")
    assert card.limitations == "Adults only.\nNo contrast phases." and card.licence == ""
    empty = parse_model_card("## Notes\n\n- Good for nothing in particular\n")
    assert (empty.title, empty.intended_use, empty.limitations) == ("", "", "")


def test_bullets_with_continuation_lines():
    card = parse_model_card("# M\n\n- Good for: tests;\n  demos.\n- Not good for: clinical use.\n")
    assert card.intended_use == "Tests; demos." and card.limitations == "Clinical use."


def test_model_card_of_presets_and_directories(tmp_path):
    assert "weights are random" in parse_model_card(model_card_markdown("preset:tiny")).limitations
    assert model_card_markdown(str(tmp_path)) == ""  # a directory without a card
    (tmp_path / "README.md").write_text("# R\n\n## Limitations\n\nnone known\n")
    assert parse_model_card(model_card_markdown(str(tmp_path))).limitations == "none known"
