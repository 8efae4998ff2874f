"""Spec loading is bounded: alias bombs, deep nesting, huge files and bad bytes are one-line errors (issue 11)."""

from __future__ import annotations

import time

import pytest

from factory.errors import SpecError
from factory.spec import load_spec, parse_spec
from factory.spec_source import MAX_SPEC_BYTES

GOOD = """\
name: anchors
version: "1"
model: preset:tiny
output_root: /tmp/anchors
cohorts:
  - name: a
    count: 1
    body_region: chest
    output_size: [32, 32, 32]
    spacing_mm: [8, 8, 8]
    qc: &strict {max_retries: 1, organ_hu_check: false}
  - name: b
    count: 1
    body_region: abdomen
    output_size: [32, 32, 32]
    spacing_mm: [8, 8, 8]
    qc: *strict
"""


def _laughs(levels: int) -> str:
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return text + "name: x\n"


def test_anchors_and_aliases_within_the_budget_still_work():
    spec = parse_spec(GOOD)
    assert spec.cohorts[1].qc.max_retries == 1 and spec.cohorts[1].qc.organ_hu_check is False


@pytest.mark.parametrize("levels", [7, 10])
def test_billion_laughs_is_one_error_in_well_under_a_second(levels):
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"^<string>:\d+: .* expects at most 100000 YAML nodes with "
                                        r"aliases expanded, but got more"):
        parse_spec(_laughs(levels))
    assert time.perf_counter() - t0 < 2.0


def test_deep_nesting_is_one_error_not_a_recursion_error():
    with pytest.raises(SpecError, match=r" expects at most 64 levels of nesting, but got far more"):
        parse_spec("[" * 100_000)
    with pytest.raises(SpecError, match=r" expects at most 64 levels of nesting, but got more"):
        parse_spec("a: " + "[" * 80 + "]" * 80)


def test_control_characters_and_bad_bytes_are_one_line(tmp_path):
    with pytest.raises(SpecError, match=r"spec expects printable UTF-8 text, but got unacceptable "
                                        r"character #x0000"):
        parse_spec("name: x\x00\n")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match=r"load_spec expects UTF-8 text, but got an undecodable byte at offset 9"):
        load_spec(bad)


def test_oversized_spec_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(SpecError, match=rf"load_spec expects a spec file of at most {MAX_SPEC_BYTES} bytes"):
        load_spec(big)
    with pytest.raises(SpecError, match=rf"spec expects a spec of at most {MAX_SPEC_BYTES} characters"):
        parse_spec("#" * (MAX_SPEC_BYTES + 1))


@pytest.mark.parametrize(("old", "new", "message"), [
    ("count: 1\n    body_region: chest", "count: true\n    body_region: chest",
     r"cohorts\[0\]\.count expects a valid integer, but got count=True\."),
])
def test_nonsense_values_are_refused(old, new, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(GOOD.replace(old, new, 1))


@pytest.mark.parametrize(("schedule", "message"), [
    ('{cron: "a b c d e"}', r"five-field cron expression \(minute hour day month weekday\), but got "
                            r"cron='a b c d e' \(bad minute\)"),
    ('{cron: "0 25 * * *"}', r"but got cron='0 25 \* \* \*' \(bad hour\)"),
    ('{cron: "0 2 * *"}', r"but got cron='0 2 \* \*' \(not five fields\)"),
    ('{cron: "0 2 * * *", timezone: Mars/Olympus}', r"schedule expects an IANA timezone such as 'UTC' or "
                                                    r"'Europe/Berlin', but got timezone='Mars/Olympus'\."),
])
def test_bad_schedules_are_refused(schedule, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(GOOD + f"schedule: {schedule}\n")
    assert parse_spec(GOOD + 'schedule: {cron: "0 2 * * 1-5", timezone: Europe/Berlin}\n').schedule is not None


def test_absurd_output_size_is_refused_at_parse_time():
    with pytest.raises(SpecError, match=r"cohorts\[0\] expects output_size of at most 1024 voxels per axis "
                                        r"\(MAISI's largest is 512x512x768\), but got output_size=\[64, 64, 100000\]\."):
        parse_spec(GOOD.replace("output_size: [32, 32, 32]", "output_size: [64, 64, 100000]", 1))
