"""Reading spec YAML safely while remembering where each node sits (file, YAML path, line).

``yaml.SafeLoader`` only; a subclass composes the node tree so every mapping key and sequence item
gets its 1-based line number, and duplicate keys (which plain YAML loaders silently merge) become
issues. Validation errors from pydantic are turned into :class:`factory.errors.SpecIssue` lines that
name the file, the YAML path and the line.

Loading is bounded (issue 11): at most :data:`MAX_SPEC_BYTES` of text, :data:`MAX_DEPTH` levels of
nesting and :data:`MAX_NODES` nodes counted with every alias expanded, so a "billion laughs" spec or
100,000 nested brackets is one located error, not gigabytes or a RecursionError. The source-map walk
visits each expanded node once, so its cost is bounded by the same budget.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from factory.errors import SpecIssue

Path_ = tuple[str | int, ...]
MAX_SPEC_BYTES = 1_000_000  # a real spec is a few KB
MAX_NODES = 100_000  # YAML nodes with aliases expanded (a cohort is about 30)
MAX_DEPTH = 64  # nesting levels


class _TooLarge(Exception):
    """Raised inside the walk when the spec exceeds a budget; carries the issue."""

    def __init__(self, issue: SpecIssue) -> None:
        super().__init__(issue.message)
        self.issue = issue


class LineLoader(yaml.SafeLoader):
    """A ``SafeLoader`` whose nodes keep their start marks (used to build a :class:`SourceMap`)."""


@dataclass
class SourceMap:
    """Where each YAML path of a spec was read from."""

    source: str = "<dict>"
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Iterable[str | int]) -> int | None:
        """Return the line of ``path`` or of its closest known parent."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def issue(self, path: Iterable[str | int], message: str) -> SpecIssue:
        """Return an issue located at ``path``."""
        p = tuple(path)
        return SpecIssue(path=format_path(p), message=message, source=self.source, line=self.line_of(p))


def format_path(path: Iterable[str | int]) -> str:
    """Return ``cohorts[1].pathology`` for ``("cohorts", 1, "pathology")``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _walk(node: yaml.Node, path: Path_, smap: SourceMap, issues: list[SpecIssue], budget: list[int]) -> None:
    budget[0] -= 1
    line = node.start_mark.line + 1
    if budget[0] < 0:
        raise _TooLarge(SpecIssue(format_path(path), f"DatasetSpec expects at most {MAX_NODES} YAML nodes with "
                                  f"aliases expanded, but got more (at line {line}). Remove the anchors/aliases "
                                  "that repeat large blocks.", smap.source, line))
    if len(path) > MAX_DEPTH:
        raise _TooLarge(SpecIssue(format_path(path[:8]) + "...", f"DatasetSpec expects at most {MAX_DEPTH} levels "
                                  f"of nesting, but got more (at line {line}).", smap.source, line))
    smap.lines.setdefault(path, line)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                issues.append(SpecIssue(
                    path=format_path((*path, key)), source=smap.source, line=line,
                    message=(f"DatasetSpec expects each key once per mapping, but got key={key!r} again "
                             f"(first on line {seen[key]}). Remove one of them."),
                ))
                continue
            seen[key] = line
            smap.lines[(*path, key)] = line
            _walk(value_node, (*path, key), smap, issues, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            smap.lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), smap, issues, budget)


def _unreadable(exc: yaml.YAMLError, source: str) -> SpecIssue:
    return SpecIssue("", f"DatasetSpec expects printable UTF-8 text, but got {' '.join(str(exc).split())}.",
                     source, None)


def load_yaml(text: str, source: str) -> tuple[Any, SourceMap, list[SpecIssue]]:
    """Parse YAML text safely; return (data, source map, issues such as duplicate keys or syntax errors)."""
    smap = SourceMap(source=source)
    if len(text) > MAX_SPEC_BYTES:
        return None, smap, [SpecIssue("", f"DatasetSpec expects a spec of at most {MAX_SPEC_BYTES} characters, but "
                                          f"got {len(text)}.", source, None)]
    try:
        loader = LineLoader(text)
    except yaml.YAMLError as exc:  # ReaderError: control characters or NUL
        return None, smap, [_unreadable(exc, source)]
    try:
        node = loader.get_single_node()
        if node is None:
            return None, smap, [SpecIssue("", "DatasetSpec expects a YAML mapping, but got an empty "
                                              "document.", source, 1)]
        issues: list[SpecIssue] = []
        _walk(node, (), smap, issues, [MAX_NODES])
        data = loader.construct_document(node)
    except _TooLarge as exc:
        return None, smap, [exc.issue]
    except RecursionError:
        return None, smap, [SpecIssue("", f"DatasetSpec expects at most {MAX_DEPTH} levels of nesting, but got "
                                          "far more (the YAML parser gave up).", source, None)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        return None, smap, [SpecIssue("", f"DatasetSpec expects valid YAML, but got a syntax error: "
                                          f"{exc.problem or exc}.", source, line)]
    except yaml.YAMLError as exc:  # ReaderError: control characters, NUL, undecodable bytes
        return None, smap, [_unreadable(exc, source)]
    finally:
        loader.dispose()
    return data, smap, issues


# -- pydantic errors -> issues --------------------------------------------------------------------

def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def drop_missing_explained_by_typos(errors: list[Mapping[str, Any]],
                                    field_names: Mapping[Path_, Iterable[str]]) -> list[Mapping[str, Any]]:
    """Drop a "missing field" error when an unknown key next to it is a typo of that field.

    ``body_regoin:`` gives pydantic two errors (``body_region`` missing, ``body_regoin`` not allowed); the
    second, with its "Did you mean 'body_region'?", says all there is to say.
    """
    typos = set()
    for err in errors:
        if err["type"] == "extra_forbidden" and err["loc"]:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _TAGS))
            parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
            close = difflib.get_close_matches(str(loc[-1]), [str(c) for c in field_names.get(parent, ())], n=1,
                                              cutoff=0.6)
            if close:
                typos.add((*loc[:-1], close[0]))
    return [e for e in errors if not (e["type"] == "missing"
                                      and tuple(p for p in e["loc"] if not (isinstance(p, str) and p in _TAGS))
                                      in typos)]


def _hint(value: Any, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def issue_from_pydantic(err: Mapping[str, Any], smap: SourceMap, field_names: Mapping[Path_, Iterable[str]]
                        ) -> SpecIssue:
    """Turn one entry of ``ValidationError.errors()`` into a located issue in the house message style.

    Args:
        err: the pydantic error dict (``type``, ``loc``, ``msg``, ``input``, ``ctx``).
        smap: where the spec was read from.
        field_names: allowed field names by the (index-free) path of their parent, for "did you mean".
    """
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _TAGS))
    kind, msg, value = err["type"], err["msg"], err.get("input")
    name = str(loc[-1]) if loc else "spec"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        parent = format_path(loc[:-1])
        return smap.issue(loc[:-1], f"DatasetSpec expects more items in {parent}, but got no item [{loc[-1]}]. "
                                    "Give all of them.")
    elif kind == "missing":
        owner = format_path(loc[:-1]) or "spec"
        text = f"{owner} expects the field {name!r}, but got none. Add it."
    elif kind == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
        allowed = sorted(field_names.get(parent, ()))
        owner = format_path(loc[:-1]) or "spec"
        text = (f"{owner} expects only the fields {allowed}, but got {name}={_shown(value)}."
                f"{_hint(name, allowed)}")
    elif kind in ("value_error", "assertion_error"):
        text = str(err.get("ctx", {}).get("error", msg))
    elif kind == "literal_error":
        expected = str(err.get("ctx", {}).get("expected", ""))
        choices = [c.strip().strip("'\"") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        text = f"DatasetSpec expects {name} in {choices}, but got {name}={_shown(value)}.{_hint(value, choices)}"
    elif kind == "union_tag_invalid":
        expected = str(err.get("ctx", {}).get("expected_tags", ""))
        choices = [c.strip().strip("'\"") for c in expected.split(",") if c.strip()]
        tag = err.get("ctx", {}).get("tag")
        text = f"DatasetSpec expects type in {choices}, but got type={tag!r}.{_hint(tag, choices)}"
    else:
        rule = msg or kind
        for prefix, repl in (("Input should be greater", "a value greater"), ("Input should be less", "a value less"),
                             ("Input should be ", ""), ("String should match", "a string matching"),
                             ("String should have", "a string with"), ("List should have", "a list with"),
                             ("Tuple should have", "a list with")):
            if rule.startswith(prefix):
                rule = repl + rule[len(prefix):]
                break
        text = f"DatasetSpec expects {rule}, but got {name}={_shown(value)}."
    return smap.issue(loc, text)


_TAGS = {"phantom", "folder", "user", "maisi_mask_generator"}  # discriminated-union tags pydantic puts in loc
