"""The generator model's card as the catalog keeps it: intended use, limitations and licence.

A run stores the model card's Markdown in its ``datasets`` row (column ``model_card``), so the dataset
card and the Croissant export say what the data is good for wherever the catalog is read, without the
model directory. :func:`parse_model_card` reads the parts they need from the Markdown:

* intended use: a section headed "Intended use" (or "Uses"), or a bullet starting "Good for:";
* limitations: a section headed "Limitations" (or "Out-of-scope use"), or a bullet starting "Not good for:";
* licence: a section headed "Licence" or "License";
* title: the first level-1 heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INTENDED = re.compile(r"^(intended use|intended uses|uses)\b", re.IGNORECASE)
_LIMITS = re.compile(r"^(limitations?|out-of-scope use|bias, risks,? and limitations)\b", re.IGNORECASE)
_LICENCE = re.compile(r"^licen[cs]e\b", re.IGNORECASE)
_GOOD = re.compile(r"^\s*[-*]\s+good for:\s*", re.IGNORECASE)
_NOT_GOOD = re.compile(r"^\s*[-*]\s+not good for:\s*", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*]\s+")


@dataclass(frozen=True)
class ModelCard:
    """The parts of a model card that a dataset's card and metadata repeat.

    Attributes:
        title: the card's first heading ("" when none).
        intended_use: what the model (and so the data) is meant for ("" when the card does not say).
        limitations: what it is not good for ("" when the card does not say).
        licence: the card's licence section ("" when none).
        markdown: the whole card.
    """

    title: str
    intended_use: str
    limitations: str
    licence: str
    markdown: str


def _sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Split Markdown into ``(heading, body lines)``; text before the first heading has heading ``""``."""
    out: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            out.append((match.group(2), []))
        else:
            out[-1][1].append(line)
    return out


def _bullet_text(lines: list[str], start: int, pattern: re.Pattern[str]) -> str:
    """The text of the bullet at ``start`` (with its indented continuation lines), its prefix removed."""
    parts = [pattern.sub("", lines[start]).strip()]
    for line in lines[start + 1:]:
        if not line.strip() or _BULLET.match(line) or not line.startswith((" ", "\t")):
            break
        parts.append(line.strip())
    text = " ".join(p for p in parts if p)
    return text[:1].upper() + text[1:]  # "Good for: running ..." reads as a sentence on its own


def _paragraphs(lines: list[str]) -> str:
    return "\n".join(lines).strip()


def parse_model_card(markdown: str) -> ModelCard:
    """Read title, intended use, limitations and licence from a model card's Markdown.

    Args:
        markdown: the card's text.

    Returns:
        The parts found; a part the card does not state is ``""`` (never invented).
    """
    lines = markdown.splitlines()
    sections = _sections(lines)
    first = next((m for m in map(_HEADING.match, lines) if m), None)
    title = first.group(2) if first is not None and len(first.group(1)) == 1 else ""
    intended = limits = licence = ""
    for heading, body in sections:
        if _INTENDED.match(heading) and not intended:
            intended = _paragraphs(body)
        elif _LIMITS.match(heading) and not limits:
            limits = _paragraphs(body)
        elif _LICENCE.match(heading) and not licence:
            licence = _paragraphs(body)
    for i, line in enumerate(lines):
        if not intended and _GOOD.match(line):
            intended = _bullet_text(lines, i, _GOOD)
        if not limits and _NOT_GOOD.match(line):
            limits = _bullet_text(lines, i, _NOT_GOOD)
    return ModelCard(title=title, intended_use=intended, limitations=limits, licence=licence, markdown=markdown)
