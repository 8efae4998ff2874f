"""Batched generation (issue 16, item 1): a batch gives each case the volume it gets alone, up to float rounding.

The seeded presets' ControlNet and UNet end in zero-initialised layers, so their output is zero whatever
the batch: a batch of them matches batch 1 trivially. These tests therefore redraw every ControlNet and
UNet weight (:func:`busy`), check that the networks' output is not trivial, and compare batched volumes
with one-at-a-time ones within a float-rounding tolerance: a mixed-up seed, mask or noise draw differs by
hundreds of HU, rounding by thousandths (the CPU's convolution kernels sum in another order for another
batch size).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from maisi_core import MaisiPipeline, presets
from maisi_core.engine.batching import CaseMemory, batch_size_for_memory
from maisi_core.errors import ConfigError
from test_pipeline import _tiny_ddpm

SPACING = (1.5, 1.5, 1.5)
ROUNDING_HU = 0.05  # measured: 0.004-0.007 HU after 3 steps on these weights, 0.004-0.006 on the shipped default


def busy(config) -> MaisiPipeline:
    """A pipeline whose ControlNet and UNet weights are all redrawn (seeded), so both networks do real work."""
    pipe = MaisiPipeline.from_config(config, device="cpu")
    rng = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (pipe.unet, pipe.controlnet):
            for param in net.parameters():
                param.copy_(torch.randn(param.shape, generator=rng) * 0.05)
    return pipe


@pytest.fixture(scope="module")
def busy_pipe() -> MaisiPipeline:
    return busy(presets.tiny())


def _maps(label_map: np.ndarray) -> list[np.ndarray]:
    """Three different masks of one size: as given, with a liver tumour, with the spleen grown."""
    tumour = label_map.copy()
    tumour[9:11, 9:11, 9:11] = 26
    spleen = label_map.copy()
    spleen[20:26, 8:14, 10:16] = 3
    return [label_map, tumour, spleen]


def _rounding(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_busy_weights_make_the_networks_work(busy_pipe, label_map):
    """The guard of this file: with the seeded preset the velocity is zero, with busy weights it is not."""
    def velocity(pipe):
        cond = pipe.prepare_conditioning(SPACING, label_map=label_map)
        emb, _, _ = pipe.embed_conditions([label_map], [cond], 0.0)
        x = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return pipe._velocity(x, torch.tensor(500.0), emb, cond)

    assert float(velocity(MaisiPipeline.from_config(presets.tiny(), device="cpu")).abs().max()) == 0.0
    assert float(velocity(busy_pipe).abs().max()) > 0.1


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_rflow_batch_equals_one_at_a_time(busy_pipe, label_map, guidance):
    maps, seeds = _maps(label_map), [11, 12, 13]
    alone = [busy_pipe.generate(m, spacing_mm=SPACING, seed=s, num_inference_steps=3, guidance_scale=guidance)
             for m, s in zip(maps, seeds)]
    batch = busy_pipe.generate_batch(maps, spacing_mm=SPACING, seeds=seeds, num_inference_steps=3,
                                     guidance_scale=guidance)
    assert [o.batch_size for o in batch] == [3, 3, 3] and [o.seed for o in batch] == seeds
    for a, b in zip(alone, batch):
        assert _rounding(a.image, b.image) < ROUNDING_HU
        assert np.array_equal(a.label_map, b.label_map) and np.array_equal(a.affine, b.affine)
    body = maps[0] > 0
    assert _rounding(batch[0].image[body], batch[2].image[body]) > 100  # the cases stay distinct
    again = busy_pipe.generate_batch(maps, spacing_mm=SPACING, seeds=seeds, num_inference_steps=3,
                                     guidance_scale=guidance)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(batch, again))  # the same batch: the same bits
    swapped = busy_pipe.generate_batch(maps, spacing_mm=SPACING, seeds=[12, 11, 13], num_inference_steps=3,
                                       guidance_scale=guidance)
    assert _rounding(swapped[0].image[body], alone[0].image[body]) > 100  # what a mixed-up seed would look like
    assert batch[0].timings_s["denoise_batch"] == pytest.approx(3 * batch[0].timings_s["denoise"])


def test_ddpm_step_noise_is_drawn_per_case(label_map):
    pipe = busy(_tiny_ddpm())
    maps, seeds = _maps(label_map)[:2], [5, 6]
    alone = [pipe.generate(m, spacing_mm=SPACING, seed=s, num_inference_steps=4) for m, s in zip(maps, seeds)]
    batch = pipe.generate_batch(maps, spacing_mm=SPACING, seeds=seeds, num_inference_steps=4)
    for a, b in zip(alone, batch):
        assert _rounding(a.image, b.image) < ROUNDING_HU


def test_a_batch_that_runs_out_of_memory_is_split_and_remembered(busy_pipe, label_map, monkeypatch):
    maps = _maps(label_map) + [label_map]
    seeds = [1, 2, 3, 4]
    alone = [busy_pipe.generate(m, spacing_mm=SPACING, seed=s, num_inference_steps=2) for m, s in zip(maps, seeds)]
    run_batch, sizes = MaisiPipeline.run_batch, []

    def small_device(self, requests, **kwargs):
        sizes.append(len(requests))
        if len(requests) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_batch(self, requests, **kwargs)

    monkeypatch.setattr(MaisiPipeline, "run_batch", small_device)
    monkeypatch.setattr(busy_pipe, "_batch_caps", {})
    batch = busy_pipe.generate_batch(maps, spacing_mm=SPACING, seeds=seeds, num_inference_steps=2)
    assert sizes == [4, 2, 2]
    assert [o.seed for o in batch] == seeds and [o.batch_size for o in batch] == [2, 2, 2, 2]
    assert all(_rounding(a.image, b.image) < ROUNDING_HU for a, b in zip(alone, batch))
    assert busy_pipe._batch_caps == {(32, 32, 32): 2}


def test_one_out_of_memory_case_is_not_split(tiny_pipe, label_map, monkeypatch):
    def no_memory(self, requests, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(MaisiPipeline, "run_batch", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        tiny_pipe.generate_batch([label_map], spacing_mm=SPACING, seeds=[0], num_inference_steps=1)


def test_a_batch_refuses_mixed_sizes_and_miscounted_seeds(tiny_pipe, label_map):
    small = np.ascontiguousarray(label_map[:, :, :16])
    with pytest.raises(ConfigError, match="one output size"):
        tiny_pipe.generate_batch([label_map, small], spacing_mm=SPACING, seeds=[0, 1], num_inference_steps=1)
    with pytest.raises(ConfigError, match="one seed"):
        tiny_pipe.generate_batch([label_map, label_map], spacing_mm=SPACING, seeds=[0], num_inference_steps=1)


def test_a_cpu_pipeline_batches_small_latents_only(tiny_pipe):
    assert tiny_pipe.suggest_batch_size((32, 32, 32), SPACING, limit=8) == 4  # latent 8^3: the CPU's most
    assert tiny_pipe.suggest_batch_size((32, 32, 32), SPACING, limit=3) == 3
    assert tiny_pipe.suggest_batch_size((128, 128, 128), SPACING, limit=8) == 4  # latent 32^3
    assert tiny_pipe.suggest_batch_size((160, 160, 160), SPACING, limit=8) == 2  # latent 40^3
    assert tiny_pipe.suggest_batch_size((256, 256, 128), SPACING, limit=8) == 1


@pytest.mark.parametrize(("free_gb", "limit", "expected"), [
    (80, 8, 5),  # 0.8 * 80 - 4 = 60 GB usable, 12 GB per case
    (80, 3, 3),  # the limit caps it
    (10, 8, 1),  # less than one case fits: still one (the decode preset and an OOM split handle the rest)
    (0, 8, 1),
])
def test_batch_size_for_memory(free_gb, limit, expected):
    memory = CaseMemory(per_case=12 * 1024**3, transient=4 * 1024**3)
    assert batch_size_for_memory(free_gb * 1024**3, memory, limit=limit) == expected


def test_batch_size_for_memory_refuses_nonsense():
    with pytest.raises(ConfigError, match="limit >= 1"):
        batch_size_for_memory(10, CaseMemory(1, 0), limit=0)
    with pytest.raises(ConfigError, match="per_case > 0"):
        batch_size_for_memory(10, CaseMemory(0, 0), limit=2)


# -- the factory: cases, records and files ---------------------------------------------------------


QC_OFF = "{organ_hu_check: false, orientation_check: false, agreement_check: false, tumor_check: false, max_retries: 2}"
"""The busy weights make noise, not CT: every image check off, so attempts fail only where a test says."""
FROM_VOXELS = ("image_sha256", "image_bytes", "organ_median", "label_agreement", "tumor_contrast_hu")


def _comparable(record) -> dict:
    from catalog.schema import VOLATILE_COLUMNS

    return {k: v for k, v in record.to_row().items() if k not in VOLATILE_COLUMNS}


def _alike(batched, alone) -> None:
    """Two runs' records agree: exactly, except what is measured from the image voxels (within rounding)."""
    for b, a in zip(batched, alone, strict=True):
        rb, ra = _comparable(b), _comparable(a)
        assert {k: v for k, v in rb.items() if k not in FROM_VOXELS} == \
            {k: v for k, v in ra.items() if k not in FROM_VOXELS}
        assert dict(rb["organ_median"]).keys() == dict(ra["organ_median"]).keys()
        assert all(abs(dict(rb["organ_median"])[k] - v) <= 1.0 for k, v in dict(ra["organ_median"]).items())


def _voxels_alike(batched: dict, alone: dict) -> None:
    """Written images within 1 HU (int16 rounding of a float difference), label maps byte for byte."""
    import gzip
    import io

    import nibabel as nib

    assert batched.keys() == alone.keys()
    for name in alone:
        if name.startswith("labels/"):
            assert batched[name] == alone[name]
            continue
        a, b = (nib.Nifti1Image.from_stream(io.BytesIO(gzip.decompress(f[name]))).get_fdata() for f in (alone, batched))
        assert float(np.abs(a - b).max()) <= 1.0


def _run(tmp_path, name: str, spec, batch_size, make_mask_fn=None, overlap=None, generator=None):
    from catalog.root import DatasetRoot
    from factory.case import PipelineGenerator, make_case_mask, run_cases
    from factory.plan import plan_dataset

    root = tmp_path / name
    generator = generator or PipelineGenerator(busy(presets.tiny()), "tiny-busy")
    results = run_cases(plan_dataset(spec).cases, generator, root=DatasetRoot.of(root), code_version="t",
                        batch_size=batch_size, make_mask_fn=make_mask_fn or make_case_mask, overlap=overlap)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.nii.gz"))}
    return results, files


def test_run_cases_in_one_batch_writes_what_one_at_a_time_writes(tmp_path):
    """Mask retries included: the same seeds, attempts and records, the same volumes up to rounding, in batches."""
    from factory.case import make_case_mask
    from factory.plan import attempt_seed
    from maisi_core.errors import MaskSourceError
    from _specs import tiny_spec

    spec = tiny_spec(tmp_path / "x", name="batched", seed=3, count=4, steps=2, qc=QC_OFF)

    def flaky_masks(request, seed):  # case 1 cannot place its first mask: its attempt 1 joins the next round
        if request.case_index == 1 and seed == attempt_seed(request.seed, 0):
            raise MaskSourceError("tumour host outside the field of view (test)")
        return make_case_mask(request, seed)

    alone, alone_files = _run(tmp_path, "alone", spec, 1, flaky_masks)
    batched, batched_files = _run(tmp_path, "batched", spec, 4, flaky_masks)
    assert [r.status for r in alone] == ["passed"] * 4 and [r.attempt for r in alone] == [0, 1, 0, 0]
    _alike(batched, alone)
    _voxels_alike(batched_files, alone_files)
    assert len(batched_files) == 8
    assert [r.generation_batch for r in alone] == [1] * 4
    assert [r.generation_batch for r in batched] == [3, 1, 3, 3]  # case 1's attempt 1 ran alone in round 2


def test_run_cases_failures_are_recorded_alike_in_batches(tmp_path):
    from _specs import UNREACHABLE_QC, tiny_spec

    spec = tiny_spec(tmp_path / "x", name="failing", seed=4, count=3, steps=1, qc=UNREACHABLE_QC)
    alone, _ = _run(tmp_path, "alone", spec, 1)
    batched, files = _run(tmp_path, "batched", spec, "auto")  # auto: the three at once (a small latent)
    assert files == {} and [r.status for r in batched] == ["failed"] * 3
    _alike(batched, alone)
    two, _ = _run(tmp_path, "two", spec, 2)
    _alike(two, alone)
    assert [r.generation_batch for r in two] == [2, 2, 1]


def test_overlapping_checks_write_what_one_thread_writes(tmp_path, monkeypatch):
    """QC and writes on a second thread while the next batch is generated: same records, files and retries."""
    import threading

    import factory.case as case_module
    from _specs import tiny_spec

    spec = tiny_spec(tmp_path / "x", name="overlap", seed=6, count=5, steps=1, qc=QC_OFF)
    threads, check = set(), case_module._check_and_write
    flaky = {}

    def spy(case, *args, **kwargs):
        threads.add(threading.current_thread().name)
        if case.request.case_index == 3 and case.attempt == 0:  # one QC failure: retried in the next round
            flaky[case.request.sample_id] = True
            case.reasons.append("attempt 0: qc: failed on purpose (test)")
            case.attempt += 1
            return None
        return check(case, *args, **kwargs)

    monkeypatch.setattr(case_module, "_check_and_write", spy)
    plain, plain_files = _run(tmp_path, "plain", spec, 2, overlap=False)
    assert threads == {threading.current_thread().name}
    threads.clear()
    overlapped, files = _run(tmp_path, "overlap", spec, 2, overlap=True)
    assert threads == {"ctfactory-check_0"}
    assert [_comparable(r) for r in overlapped] == [_comparable(r) for r in plain]
    assert files == plain_files and len(files) == 10 and overlapped[3].attempt == 1


def test_an_error_in_an_overlapped_check_reaches_the_caller(tmp_path, monkeypatch):
    import factory.case as case_module
    from _specs import tiny_spec

    def broken_disk(*args, **kwargs):
        raise OSError("No space left on device (test)")

    monkeypatch.setattr(case_module, "_check_and_write", broken_disk)
    with pytest.raises(OSError, match="No space left"):
        _run(tmp_path, "full", tiny_spec(tmp_path / "x", name="full", seed=7, count=3, steps=1), 2, overlap=True)


def test_an_unusable_input_in_a_batch_is_found_and_the_others_go_on(tmp_path, monkeypatch):
    from factory.case import PipelineGenerator
    from factory.errors import CaseInputError
    from maisi_core.errors import LabelMapError
    from _specs import tiny_spec

    spec = tiny_spec(tmp_path / "x", name="oneinput", seed=5, count=3, steps=1)
    generate, generate_batch = PipelineGenerator.generate, PipelineGenerator.generate_batch

    def refuse_case_2(self, request, mask, *, seed):
        if request.case_index == 2:
            raise LabelMapError("MaisiPipeline[tiny] expects known label IDs, but got 250 (test).")
        return generate(self, request, mask, seed=seed)

    def refuse_batches_with_case_2(self, requests, masks, seeds):
        if any(r.case_index == 2 for r in requests):
            raise LabelMapError("MaisiPipeline[tiny] expects known label IDs, but got 250 (test).")
        return generate_batch(self, requests, masks, seeds)

    monkeypatch.setattr(PipelineGenerator, "generate", refuse_case_2)
    monkeypatch.setattr(PipelineGenerator, "generate_batch", refuse_batches_with_case_2)
    results, files = _run(tmp_path, "b", spec, 3)
    assert [type(r).__name__ for r in results] == ["SampleRecord", "SampleRecord", "CaseInputError"]
    assert isinstance(results[2], CaseInputError) and "250" in str(results[2])
    assert len(files) == 4


def test_batch_cases_groups_by_size_spacing_and_steps_and_spreads_over_slots(tmp_path):
    from factory.plan import batch_cases, cases_per_task, plan_dataset
    from factory.spec import parse_spec
    from _specs import tiny_spec_text

    big = "  - {name: big, count: 3, body_region: chest, output_size: [32, 32, 64], spacing_mm: [8, 8, 8]}\n"
    spec = parse_spec(tiny_spec_text(tmp_path, name="groups", count=8, cohort="small") + big)
    cases = plan_dataset(spec).cases
    tasks = batch_cases(cases, 3)
    assert [[c.cohort for c in t] for t in tasks] == [["small"] * 3, ["small"] * 3, ["small"] * 2, ["big"] * 3]
    assert [c.sample_id for t in tasks for c in t] == [c.sample_id for c in cases]  # every case once, in order
    assert [len(t) for t in batch_cases(cases, 8, slots=4)] == [2, 2, 2, 2, 1, 1, 1]
    assert cases_per_task("auto", device="cpu") == 1 and cases_per_task("auto", device="cuda:0") == 8
    assert cases_per_task("auto", device="cpu", latent_voxels=16**3) == 4  # 64^3 on the default model
    assert cases_per_task("auto", device="cpu", latent_voxels=64 * 64 * 32) == 1  # 256x256x128
    assert cases_per_task(5, device="cpu") == 5
    assert [len(t) for t in batch_cases(cases, lambda case: 4 if case.cohort == "small" else 1)] == [4, 4, 1, 1, 1]


# -- the spec, the command line and the flow ------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (1, True), (64, True), (0, False), (65, False),
                                           ("4", False), (True, False), (2.5, False)])
def test_spec_generation_batch_is_auto_or_1_to_64(tmp_path, value, ok):
    from factory.errors import SpecError
    from factory.spec import validate_spec
    from _specs import tiny_spec

    data = tiny_spec(tmp_path).model_dump(mode="json")
    data["runtime"]["generation_batch"] = value
    if ok:
        assert validate_spec(data).runtime.generation_batch == value
        return
    with pytest.raises(SpecError, match=r"runtime\.generation_batch expects generation_batch 'auto' or a whole "
                                        r"number from 1 to 64, but got generation_batch="):
        validate_spec(data)


def test_command_line_overrides_fail_like_spec_fields(tmp_path):
    from factory.errors import SpecError
    from _specs import tiny_spec

    spec = tiny_spec(tmp_path)
    assert spec.with_runtime(generation_batch=3, concurrency_limit="gpu-0").runtime.generation_batch == 3
    with pytest.raises(SpecError, match=r"^command line: runtime\.batch_size expects a value greater than or equal "
                                        r"to 1, but got batch_size=0\.$"):
        spec.with_runtime(batch_size=0)
    with pytest.raises(SpecError, match=r"runtime\.concurrency_limit"):
        spec.with_runtime(concurrency_limit="gpu slots; rm -rf /")


def _sha(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.nii.gz"))}


def test_flow_with_generation_batch_commits_the_same_cases(prefect_backend, tmp_path):
    """The flow's wiring: tasks of two cases, records of batch 2. (preset:tiny's zero-initialised output layers
    make the bytes equal too; the tests above compare volumes with busy weights.)"""
    from catalog.store import open_catalog
    from flows.generate import run_generate
    from _specs import tiny_spec

    fields = {"name": "batchflow", "seed": 8, "count": 3, "steps": 2}
    one = run_generate(tiny_spec(tmp_path / "one", runtime="{generation_batch: 1}", **fields))
    two = run_generate(tiny_spec(tmp_path / "two", runtime="{generation_batch: 2}", **fields))
    assert one["generated"] == two["generated"] == 3 and one["spec_id"] == two["spec_id"]
    rows = sorted(open_catalog(tmp_path / "two").read_table().to_pylist(), key=lambda r: r["case_index"])
    assert [r["generation_batch"] for r in rows] == [2, 2, 1] and {r["status"] for r in rows} == {"passed"}
    assert _sha(tmp_path / "one") == _sha(tmp_path / "two") and len(_sha(tmp_path / "one")) == 6


def test_flow_concurrency_limit_must_exist_and_serialises_cases(prefect_backend, tmp_path):
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.errors import ConcurrencyLimitError
    from flows.generate import run_generate
    from _specs import tiny_spec

    runtime = "{generator: 'sleep:0.6', max_workers: 3, concurrency_limit: gpu-test}"
    spec = tiny_spec(tmp_path / "a", name="limited", count=3, runtime=runtime)
    with pytest.raises(ConcurrencyLimitError, match=r"^runtime\.concurrency_limit expects a global concurrency "
                                                    r"limit that exists on the Prefect API, but got "
                                                    r"concurrency_limit='gpu-test'"):
        run_generate(spec)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-test", limit=1))
    t0 = time.perf_counter()
    summary = run_generate(spec)
    assert summary["generated"] == 3
    # three threads, one slot: the 0.6 s cases ran one after another (together they would take ~0.6 s)
    assert summary["timings_s"]["generate"] >= 1.8 - 0.05, summary["timings_s"]
    assert time.perf_counter() - t0 >= 1.8


def test_run_with_an_unknown_concurrency_limit_exits_2(tmp_path, capsys, monkeypatch):
    """The flow raises before any case (test above); the command line reports it as bad input, exit 2."""
    import flows.cli_run as cli_run
    import flows.generate as generate_module
    from flows.cli import main
    from flows.errors import ConcurrencyLimitError
    from _specs import tiny_spec_text

    for key in [*cli_run._PREFECT_DEFAULTS, "PREFECT_LOGGING_LEVEL"]:  # restored after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
        monkeypatch.delenv(key)
    for name in ("_boot_ephemeral_server", "_drain_prefect", "_quiet_prefect_console"):  # no Prefect here
        monkeypatch.setattr(cli_run, name, lambda: None)
    seen = {}

    def refuse(spec, **kwargs):
        seen["limit"] = spec.runtime.concurrency_limit
        raise ConcurrencyLimitError("runtime.concurrency_limit expects a global concurrency limit that exists on "
                                    "the Prefect API, but got concurrency_limit='no-such-limit', which ... (test)")

    monkeypatch.setattr(generate_module, "run_generate", refuse)
    spec = tmp_path / "spec.yaml"
    spec.write_text(tiny_spec_text(tmp_path / "ds", name="nolimit", count=2, runtime="{generator: 'sleep:0'}"))
    assert main(["run", str(spec), "--concurrency-limit", "no-such-limit", "--no-progress"]) == 2
    assert seen == {"limit": "no-such-limit"}  # the option reached the spec's runtime
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ctfactory run: runtime.concurrency_limit expects a global concurrency limit"), err


def test_measure_case_memory_reads_the_allocator_around_one_embedding_and_one_step(tiny_pipe, monkeypatch):
    """The CUDA measurement's wiring and arithmetic, on the CPU with a scripted allocator (no GPU here)."""
    import types

    from maisi_core.engine import batching

    allocated = iter([1000, 1600])  # before the embedding; after it (the embedding held: 600)
    peaks = iter([5000, 3600])  # embedding peak; step peak
    fake_cuda = types.SimpleNamespace(
        synchronize=lambda device: None, reset_peak_memory_stats=lambda device: None,
        memory_allocated=lambda device: next(allocated), max_memory_allocated=lambda device: next(peaks))
    monkeypatch.setattr(torch, "cuda", fake_cuda)
    pipe = types.SimpleNamespace(**{name: getattr(tiny_pipe, name) for name in (
        "config", "controlnet", "prepare_conditioning", "prepare_timesteps", "prepare_control", "_autocast",
        "_velocity")}, device=types.SimpleNamespace(type="cuda"))
    memory = batching.measure_case_memory(pipe, (32, 32, 32), SPACING)
    assert memory == batching.CaseMemory(per_case=(3600 - 1600) + 600, transient=5000 - 1000)
    with pytest.raises(ConfigError, match="expects a CUDA pipeline"):
        batching.measure_case_memory(tiny_pipe, (32, 32, 32), SPACING)
