"""A volume this machine cannot hold is refused before any case, with the estimate and the limit (issue 12)."""

from __future__ import annotations

import pytest

from factory.errors import SpecError
from factory.plan import CPU_BYTES_PER_VOXEL, plan_dataset
from factory.preflight import check_memory
from factory.spec import parse_spec

GB = 1024**3

SPEC = """\
name: mem
version: "1"
model: {model}
output_root: /tmp/never-written
cohorts:
  - name: small
    count: 4
    body_region: abdomen
    output_size: {small}
    spacing_mm: {small_spacing}
  - name: big
    count: 4
    body_region: abdomen
    output_size: {size}
    spacing_mm: {spacing}
runtime: {{max_workers: {workers}}}
"""


def _spec(model="default", size="[256, 256, 256]", spacing="[2.0, 2.0, 2.0]", workers=1, small="[64, 64, 64]",
          small_spacing="[6.0, 6.0, 6.0]"):
    spec = parse_spec(SPEC.format(model=model, size=size, spacing=spacing, workers=workers, small=small,
                                  small_spacing=small_spacing))
    return spec, plan_dataset(spec)


def test_cpu_case_larger_than_the_machine_is_refused_with_estimate_and_limit():
    spec, plan = _spec()
    need = 256**3 * CPU_BYTES_PER_VOXEL / GB  # 10 GB
    check_memory(spec, plan, device="cpu", memory_bytes=int((need + 1) * GB))  # fits
    with pytest.raises(SpecError) as info:
        check_memory(spec, plan, device="cpu", memory_bytes=8 * GB)
    (issue,) = info.value.issues
    assert issue.path == "cohorts[1].output_size"
    assert issue.message == (f"cohorts[1] expects cases that fit this machine's CPU memory of 8.0 GB, but got "
                             f"output_size=[256, 256, 256] needing about {need:.1f} GB per case x 1 at once = "
                             f"{need:.1f} GB. Use a smaller output_size, fewer runtime.max_workers, or a GPU "
                             "(runtime.device).")


def test_concurrent_cpu_cases_count_against_the_memory():
    spec, plan = _spec(size="[128, 128, 128]", spacing="[4.0, 4.0, 4.0]", workers=3)
    one = 128**3 * CPU_BYTES_PER_VOXEL / GB  # 1.25 GB
    check_memory(spec, plan, device="cpu", memory_bytes=int(3.1 * one * GB))
    with pytest.raises(SpecError, match=r"x 3 at once"):
        check_memory(spec, plan, device="cpu", memory_bytes=int(2.9 * one * GB))


def test_gpu_decode_class_above_the_card_is_refused():
    spec, plan = _spec(model="preset:maisi_ct_rflow", size="[512, 512, 768]", spacing="[1.0, 1.0, 1.0]",
                       small="[256, 256, 128]", small_spacing="[1.5, 1.5, 2.5]")
    check_memory(spec, plan, device="cuda", memory_bytes=141 * GB)  # an H200 holds the 80 GB class
    with pytest.raises(SpecError, match=r"GPU \(cuda\) memory of 24.0 GB, but got output_size=\[512, 512, 768\]"):
        check_memory(spec, plan, device="cuda", memory_bytes=24 * GB)
    check_memory(spec, plan, device="cpu", memory_bytes=1 * GB)  # windowed models: no CPU estimate, no guess


def test_check_spec_and_run_refuse_before_any_case(tmp_path, monkeypatch, capsys):
    import factory.preflight
    from flows.cli import main

    import threading

    import psutil

    def servers() -> set[int]:  # Prefect API servers below this process (a test harness's one included)
        return {p.pid for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "uvicorn" in " ".join(p.cmdline())}

    before = servers()
    monkeypatch.setattr(factory.preflight, "machine_memory_bytes", lambda device: 4 * GB)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model="default", size="[256, 256, 256]", spacing="[2.0, 2.0, 2.0]", workers=1,
                                small="[64, 64, 64]", small_spacing="[6.0, 6.0, 6.0]")
                    .replace("/tmp/never-written", "./out").replace("max_workers: 1", "max_workers: 1, device: cpu"))
    for command in ("check-spec", "run"):
        assert main([command, str(spec), "--no-progress"][:2 if command == "check-spec" else 3]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "CPU memory of 4.0 GB" in err[0] and f"{spec}:" in err[0], err
    assert not (tmp_path / "out").exists()
    # run starts Prefect's ephemeral server early (while the model loads); a refused run stops it at once
    for thread in threading.enumerate():
        if thread.name == "ctfactory-prefect-boot":
            thread.join(timeout=120)  # without the abort it would leave a healthy server behind
    assert servers() <= before
