"""``ctfactory serve`` for several workers sharing deployments: schedules kept on exit, a worker's own GPU limit."""

from __future__ import annotations

import pytest

import flows.generate as generate_module
import flows.serve as serve_module
from _specs import tiny_spec
from flows.cli import main


@pytest.fixture()
def served(monkeypatch):
    """Prefect's ``serve`` recorded, not run; the command's process-wide settings restored after the test."""
    import os

    import prefect

    import flows.cli_run as cli_run
    import flows.lifetime as lifetime

    calls = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kwargs: calls.append((deployments, kwargs)))
    monkeypatch.setattr(lifetime, "start_descendant_watch_if_ephemeral", lambda: None)
    for key in [*cli_run._PREFECT_DEFAULTS, "PREFECT_LOGGING_LEVEL", serve_module.CONCURRENCY_LIMIT_ENV]:
        monkeypatch.setenv(key, os.environ.get(key, ""))
        monkeypatch.delenv(key)
    return calls


def test_serve_pauses_schedules_on_exit_unless_asked_to_keep_them(served, tmp_path):
    from _specs import tiny_spec_text

    (tmp_path / "a.yaml").write_text(tiny_spec_text(tmp_path / "out", name="nightly",
                                                    extra="schedule: {cron: '0 2 * * *'}\n"))
    serve_module.serve_specs(tmp_path, limit=2)
    serve_module.serve_specs(tmp_path, keep_schedules=True)
    assert [kw for _, kw in served] == [{"limit": 2, "pause_on_shutdown": True},
                                        {"limit": None, "pause_on_shutdown": False}]
    assert [d.name for d in served[0][0]] == ["adhoc", "nightly"]


def test_serve_concurrency_limit_reaches_the_runs_it_executes(served, tmp_path, monkeypatch):
    from _specs import tiny_spec_text

    (tmp_path / "a.yaml").write_text(tiny_spec_text(tmp_path / "out", name="shared",
                                                    runtime="{concurrency_limit: lab-wide}"))
    assert main(["serve", str(tmp_path), "--concurrency-limit", "gpu-1", "--keep-schedules"]) == 0
    assert served[0][1] == {"limit": None, "pause_on_shutdown": False}
    seen = []
    monkeypatch.setattr(generate_module, "run_generate", lambda spec, **kw: seen.append(spec.runtime) or {})
    spec = tiny_spec(tmp_path / "out", name="shared", runtime="{concurrency_limit: lab-wide}").model_dump(mode="json")
    serve_module.run_spec.fn(spec)  # what a served run executes, with the serve process's environment
    assert seen[-1].concurrency_limit == "gpu-1"
    monkeypatch.delenv(serve_module.CONCURRENCY_LIMIT_ENV)
    serve_module.run_spec.fn(spec)  # without it the spec's own limit stands
    assert seen[-1].concurrency_limit == "lab-wide"


def test_serve_refuses_a_bad_limit_name_before_serving(served, tmp_path, capsys):
    from _specs import tiny_spec_text

    (tmp_path / "a.yaml").write_text(tiny_spec_text(tmp_path / "out", name="x"))
    assert main(["serve", str(tmp_path), "--concurrency-limit", "gpu 0; rm -rf /"]) == 2
    assert served == []
    assert "runtime.concurrency_limit expects a string matching pattern" in capsys.readouterr().err
