"""A spec names generators from a closed registry and never names code (issue 11, item 1)."""

from __future__ import annotations

import shutil
from importlib.metadata import EntryPoint

import pytest

import factory.case
from _specs import tiny_spec_text
from factory.case import SleepGenerator, check_generator_name, get_generator
from factory.errors import ModelRefError, SpecError
from factory.spec import parse_spec


def _spec_text(root, generator: str) -> str:
    """A one-case spec naming ``generator`` (default QC settings)."""
    return tiny_spec_text(root, name="reg", qc=None, runtime=f'{{generator: "{generator}"}}')


def make_test_generator(model_ref, device, decode_preset):
    """A registered factory for the tests: a zero-second stub."""
    return SleepGenerator(0.0)


def test_a_spec_naming_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    called = []
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: called.append(a))
    with pytest.raises(SpecError, match=r"runtime\.generator expects one of \['maisi', "
                                        r"'sleep:SECONDS'\], but got generator='shutil:rmtree'\. A spec names a "
                                        r"registered generator, never code"):
        parse_spec(_spec_text(tmp_path / "out", "shutil:rmtree"))
    with pytest.raises(ModelRefError, match=r"but got generator='shutil:rmtree'"):
        get_generator("shutil:rmtree", str(victim))
    assert called == [] and victim.is_dir()


@pytest.mark.parametrize("name", ["os:system", "factory.case:SleepGenerator", "sleep:", "sleep:-1", "sleep:1e9x",
                                  "maisi ", ""])
def test_generator_names_outside_the_registry_are_refused(name):
    with pytest.raises(ModelRefError, match=r"^runtime\.generator expects one of"):
        check_generator_name(name)


def test_builtin_names_pass():
    assert check_generator_name("maisi") == "maisi"
    assert check_generator_name("sleep:0.5") == "sleep:0.5"
    assert parse_spec(_spec_text("/tmp/x", "sleep:0")).runtime.generator == "sleep:0"


def test_a_registered_entry_point_generator_is_allowed(monkeypatch):
    ep = EntryPoint(name="stub", value="test_generator_registry:make_test_generator", group="ctfactory.generators")
    monkeypatch.setattr(factory.case, "registered_generators", lambda: {"stub": ep})
    assert parse_spec(_spec_text("/tmp/x", "stub")).runtime.generator == "stub"
    gen = get_generator("stub", "preset:tiny")
    assert isinstance(gen, SleepGenerator)
    with pytest.raises(ModelRefError, match=r"expects one of \['maisi', 'sleep:SECONDS', 'stub'\], but got "
                                            r"generator='stubb'\. Did you mean 'stub'\?"):
        check_generator_name("stubb")
