"""One case, as plain functions: mask → generate → QC (retries on derived seeds) → write → record.

:func:`run_case` takes a :class:`CaseRequest` and a :class:`CaseGenerator` and returns a
:class:`catalog.schema.SampleRecord` (passed or failed); :func:`run_cases`, which the ``generate-cases``
task calls, does the same for a few cases, generating those of one size and spacing together when the
generator can (:class:`BatchGenerator`): the same seeds, masks, QC, retries and records as one by one.

The generator seam
------------------
A :class:`CaseGenerator` turns (request, mask, seed) into a volume. :func:`get_generator` resolves
the spec's ``runtime.generator``:

* ``maisi`` (default): the spec's model through :func:`factory.models.load_pipeline` (cached per process).
* ``sleep:SECONDS``: :class:`SleepGenerator`, a stub that sleeps and returns a flat 40 HU body; it
  measures orchestration overhead (``benchmarks/bench_orchestration.py``).
* a name that an installed package registers in the ``ctfactory.generators`` entry-point group
  (``[project.entry-points."ctfactory.generators"] my_model = "my_pkg.gen:factory"``), whose target is
  ``factory(model_ref, device, decode_preset) -> CaseGenerator``.

The registry is closed: a spec names a generator, it never names code. A dotted path such as
``shutil:rmtree`` typed into a spec is refused when the spec is parsed (issue 11).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

from catalog.root import DatasetRoot
from catalog.schema import CASE_FIELDS, SampleRecord
from factory.errors import CaseInputError
from factory.case_masks import make_case_mask, requested_tumor_size_mm
from factory.plan import CaseRequest, attempt_seed
from factory.storage import publish_volume, unpublish, written_header

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class GeneratedVolume:
    """A generated image with the label map it was conditioned on.

    Attributes:
        image_hu: (X, Y, Z) float32 HU.
        label_map: (X, Y, Z) MAISI label IDs.
        affine: (4, 4) RAS affine of both.
        timings_s: seconds per stage.
        batch_size: how many cases were generated together with this one (itself included).
    """

    image_hu: np.ndarray
    label_map: np.ndarray
    affine: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


class CaseGenerator(Protocol):
    """The seam between the factory and a generative model."""

    model_name: str
    model_digest: str
    device: str
    precision: str  # recorded per sample; generators without it record ""

    def generate(self, request: CaseRequest, mask: Any, *, seed: int) -> GeneratedVolume:
        """Return a volume for ``request`` conditioned on ``mask`` (a ``MaskResult``), drawn from ``seed``."""


class BatchGenerator(CaseGenerator, Protocol):
    """A generator that can also make several cases of one size and spacing at once (optional)."""

    def generate_batch(self, requests: Sequence[CaseRequest], masks: Sequence[Any], seeds: Sequence[int]
                       ) -> list[GeneratedVolume]:
        """One volume per request, each the volume :meth:`generate` gives it alone."""

    def suggest_batch_size(self, request: CaseRequest, *, limit: int) -> int:
        """How many cases like ``request`` to generate at once (1 to ``limit``)."""


class PipelineGenerator:
    """A :class:`MaisiPipeline` as a case generator (one call at a time per pipeline: it is not re-entrant)."""

    def __init__(self, pipeline: Any, model_name: str) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self.model_digest = str(pipeline.model_digest or "")
        self.device = str(pipeline.device)
        self.precision = str(pipeline.precision)
        self._lock = _pipeline_lock(pipeline)

    def generate(self, request: CaseRequest, mask: Any, *, seed: int) -> GeneratedVolume:
        with self._lock:
            out = self.pipeline.generate(mask.label_map, spacing_mm=request.spacing_mm, seed=seed,
                                         num_inference_steps=request.num_inference_steps, affine=mask.affine)
        return GeneratedVolume(out.image, out.label_map, out.affine, dict(out.timings_s))

    def generate_batch(self, requests: Sequence[CaseRequest], masks: Sequence[Any], seeds: Sequence[int]
                       ) -> list[GeneratedVolume]:
        """The cases denoised together (:meth:`MaisiPipeline.generate_batch`); they share size, spacing and steps."""
        first = requests[0]
        with self._lock:
            outs = self.pipeline.generate_batch([m.label_map for m in masks], spacing_mm=first.spacing_mm,
                                                seeds=list(seeds), num_inference_steps=first.num_inference_steps,
                                                affines=[m.affine for m in masks])
        return [GeneratedVolume(o.image, o.label_map, o.affine, dict(o.timings_s), o.batch_size) for o in outs]

    def suggest_batch_size(self, request: CaseRequest, *, limit: int) -> int:
        """:meth:`MaisiPipeline.suggest_batch_size` for the request's size and spacing."""
        with self._lock:
            return self.pipeline.suggest_batch_size(request.output_size, request.spacing_mm, limit=limit)


class SleepGenerator:
    """A stub generator: sleeps ``seconds`` and returns 40 HU inside the body, -1000 HU outside."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.model_name = f"sleep:{self.seconds:g}"
        self.model_digest = "stub"
        self.device = "cpu"
        self.precision = "none"

    def generate(self, request: CaseRequest, mask: Any, *, seed: int) -> GeneratedVolume:
        time.sleep(self.seconds)
        image = np.where(mask.label_map > 0, 40.0, -1000.0).astype(np.float32)
        return GeneratedVolume(image, mask.label_map, mask.affine, {"total": self.seconds})


_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _pipeline_lock(pipeline: Any) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(id(pipeline), threading.Lock())


GENERATOR_ENTRY_POINTS = "ctfactory.generators"
_SLEEP = re.compile(r"^sleep:(\d+(\.\d*)?|\.\d+)$")


def registered_generators() -> dict[str, Any]:
    """Generator name -> entry point, for the names installed packages register (``ctfactory.generators``)."""
    return {ep.name: ep for ep in entry_points(group=GENERATOR_ENTRY_POINTS)}


def check_generator_name(name: str) -> str:
    """Return ``name`` when it is ``maisi``, ``sleep:SECONDS`` or a registered generator, else raise.

    Raises:
        ModelRefError: anything else, a ``module:function`` path in particular (a spec never names code).
    """
    from factory.errors import ModelRefError
    from maisi_core.errors import did_you_mean

    registered = registered_generators()
    if name == "maisi" or _SLEEP.match(name) or name in registered:
        return name
    allowed = ["maisi", "sleep:SECONDS", *sorted(registered)]
    hint = ""
    if name.startswith("sleep:"):
        hint = " The stub takes seconds as a non-negative number, e.g. sleep:0.5."
    elif ":" in name:
        hint = (" A spec names a registered generator, never code: register a factory in the "
                f"{GENERATOR_ENTRY_POINTS!r} entry-point group of an installed package.")
    raise ModelRefError(f"runtime.generator expects one of {allowed}, but got generator={name!r}."
                        f"{did_you_mean(name, ['maisi', *registered])}{hint}")


def get_generator(name: str, model_ref: str, device: str = "auto", decode_preset: str | None = None,
                  precision: str = "auto") -> CaseGenerator:
    """Resolve ``runtime.generator`` (see the module docstring) to a generator for ``model_ref``.

    ``precision`` reaches the ``maisi`` generator only; a registered generator picks its own.

    Raises:
        ModelRefError: a name outside the closed registry (:func:`check_generator_name`).
    """
    from factory.models import load_pipeline, model_name

    check_generator_name(name)
    if name == "maisi":
        pipeline = load_pipeline(model_ref, device, decode_preset=decode_preset, precision=precision)
        return PipelineGenerator(pipeline, model_name(model_ref))
    if name.startswith("sleep:"):
        return SleepGenerator(float(name.split(":", 1)[1]))
    factory = registered_generators()[name].load()
    return factory(model_ref, device, decode_preset)


# -- QC and the case --------------------------------------------------------------------------------

def qc_options(request: CaseRequest, mask: Any) -> dict[str, Any]:
    """The keyword arguments of ``maisi_core.evaluation.qc.check_case`` for one attempt (spec switches, expected tumour).

    The tumour's size is checked against the requested range only when the mask source placed it
    (``mask.tumors``); a tumour already in a folder or user mask keeps its own size.
    """
    tumors: dict[int, tuple[float, float] | None] = {}
    if request.tumor_label is not None:
        placed = any(t.label == request.tumor_label for t in getattr(mask, "tumors", ()))
        tumors[request.tumor_label] = requested_tumor_size_mm(request) if placed else None
    settings = request.qc
    return {"thresholds": qc_thresholds(request), "expected_tumors": tumors,
            "orientation_check": settings.orientation_check, "tumor_check": settings.tumor_check,
            "agreement_check": settings.agreement_check, "image_checks": settings.organ_hu_check}


def _qc_fields(qc: Any, tumor_label: int | None) -> dict[str, Any]:
    from maisi_core.anatomy.labels import label_name

    name = label_name(tumor_label) if tumor_label is not None else None
    return {"organ_median": dict(qc.organ_hu_median), "label_agreement": dict(qc.label_agreement),
            "tumor_contrast_hu": qc.tumor_contrast_hu.get(name), "tumor_diameter_mm": qc.tumor_diameter_mm.get(name)}


def qc_thresholds(request: CaseRequest) -> dict[str, tuple[float, float]]:
    """The organ HU ranges overriding MAISI's: the spec's, or the whole HU range when the organ check is off."""
    from maisi_core.evaluation.qc import HU_SANITY_RANGE, ORGAN_LABEL_IDS

    if not request.qc.organ_hu_check:
        return {organ: HU_SANITY_RANGE for organ in ORGAN_LABEL_IDS}
    return {k: tuple(v) for k, v in request.qc.thresholds_hu.items()}


def _record(request: CaseRequest, generator: CaseGenerator, *, seed: int, attempt: int, code_version: str,
            tumor_size_mm: float | None = None, cpu_threads: int | None = None, **fields: Any) -> SampleRecord:
    return SampleRecord(
        **{name: getattr(request, name) for name in CASE_FIELDS}, seed=seed, attempt=attempt,
        model_name=generator.model_name, model_digest=generator.model_digest, code_version=code_version,
        body_region=request.region_name, tumor_size_mm=tumor_size_mm,
        device=generator.device, precision=str(getattr(generator, "precision", "")), cpu_threads=cpu_threads,
        **fields,
    )


def run_case(request: CaseRequest, generator: CaseGenerator, *, root: DatasetRoot, code_version: str = "",
             make_mask_fn: Callable[[CaseRequest, int], Any] = make_case_mask,
             cpu_threads: int | None = None) -> SampleRecord:
    """Generate, check and write one case; return its catalog record.

    Attempt ``k`` (0 .. ``qc.max_retries``) uses ``attempt_seed(request.seed, k)``. A mask that cannot
    be made (e.g. the tumour's host is outside the field of view) or a QC failure moves on to the next
    attempt. The first passing attempt is written to ``ROOT/images`` and ``ROOT/labels``; when no
    attempt passes, nothing is written and the record has ``status="failed"`` and the reasons.

    Raises:
        CaseInputError: the input is unusable (a corrupt or malformed mask file, a map the model refuses:
            any other ``MaisiError``). Every attempt would fail alike, and it is not the case's failure,
            so nothing is recorded: fixing the input and running again generates the case.
        Exception: anything else (a bug, a lost device, storage down) propagates unrecorded too; a
            re-run retries the case.
    """
    (result,) = run_cases([request], generator, root=root, code_version=code_version, make_mask_fn=make_mask_fn,
                          cpu_threads=cpu_threads)
    if isinstance(result, CaseInputError):
        raise result
    return result


OVERLAP_PENDING = 2  # volumes that may wait for their QC and write while the next batch is generated


@dataclass
class _Attempts:
    """Where one case of :func:`run_cases` stands: its next attempt, why earlier ones failed, its own time."""

    request: CaseRequest
    attempt: int
    reasons: list[str] = field(default_factory=list)
    last_failures: tuple[str, ...] = ()
    last_qc: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0  # this case's own seconds: its masks, QC and writes, its share of each batch
    batch_size: int = 1

    @property
    def last_attempt(self) -> int:
        return self.request.first_attempt + self.request.qc.max_retries


def run_cases(requests: Sequence[CaseRequest], generator: CaseGenerator, *, root: DatasetRoot,
              code_version: str = "", make_mask_fn: Callable[[CaseRequest, int], Any] = make_case_mask,
              cpu_threads: int | None = None, batch_size: int | str = 1,
              overlap: bool | None = None) -> list[SampleRecord | CaseInputError]:
    """:func:`run_case` for several cases at once, generating those of one size and spacing together.

    The cases go through their attempts in rounds: each round makes every pending case's mask for its
    next attempt seed, generates the volumes in batches (``batch_size`` cases, or ``"auto"``: as many as
    the generator says fit, at most :data:`maisi_core.engine.batching.MAX_AUTO_BATCH`; generators without ``generate_batch`` make
    one at a time), then checks and writes each case alone. A case's seeds, masks, QC, retries and record
    are those :func:`run_case` gives it; the record adds ``generation_batch``.

    With ``overlap`` (default: on a CUDA generator) a case's QC and writes run on a second thread while
    the next batch is generated, so the GPU does not wait for the CPU's share (the GPU benchmark
    ``benchmarks/bench_batching.py --overlap`` measures it). On a CPU both would compete for the same
    cores, so it is off there.

    Returns:
        One result per request, in order: its record, or the :class:`CaseInputError` of an unusable
        input (nothing recorded for it; the other cases go on).
    """
    from maisi_core.errors import MaisiError, MaskSourceError

    cases = [_Attempts(r, r.first_attempt) for r in requests]
    results: list[SampleRecord | CaseInputError | None] = [None] * len(cases)
    while any(r is None for r in results):
        ready: list[tuple[int, Any, int, float]] = []  # (case, mask, seed, mask seconds)
        for i, case in enumerate(cases):
            if results[i] is not None:
                continue
            if case.attempt > case.last_attempt:
                results[i] = _failed_record(case, generator, code_version=code_version, cpu_threads=cpu_threads)
                continue
            seed = attempt_seed(case.request.seed, case.attempt)
            t0 = time.perf_counter()
            try:
                mask = make_mask_fn(case.request, seed)
            except MaskSourceError as exc:  # another seed may place the mask or tumour
                case.reasons.append(f"attempt {case.attempt}: mask: {exc}")
                case.attempt += 1
                continue
            except MaisiError as exc:  # an unusable input file or map: every attempt would fail the same way
                results[i] = CaseInputError(f"{case.request.sample_id}: mask: {exc}")
                continue
            finally:
                mask_s = time.perf_counter() - t0
                case.elapsed += mask_s
            ready.append((i, mask, seed, mask_s))
        by_case = {i: (mask, seed, mask_s) for i, mask, seed, mask_s in ready}
        checks: dict[int, Any] = {}  # case -> its QC and write, on the second thread
        with _checker(generator, overlap) as submit:
            for i, volume, generate_s in _generate(generator, [(i, cases[i].request, m, s) for i, m, s, _ in ready],
                                                   batch_size):
                case = cases[i]
                case.elapsed += generate_s
                if isinstance(volume, CaseInputError):
                    results[i] = volume
                    continue
                mask, seed, mask_s = by_case[i]
                checks[i] = submit(_check_and_write, case, generator, mask, volume, seed=seed, root=root,
                                   timings={"mask": mask_s, "generate": generate_s},
                                   code_version=code_version, cpu_threads=cpu_threads)
        for i, check in checks.items():
            results[i] = check.result()  # None: that attempt failed, the case goes on to its next
    return [r for r in results if r is not None]


class _Done:
    """A call already made, with the :class:`concurrent.futures.Future`'s ``result`` (the call on one thread)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._value = fn(*args, **kwargs)

    def result(self) -> Any:
        return self._value


@contextlib.contextmanager
def _checker(generator: CaseGenerator, overlap: bool | None) -> Iterator[Callable[..., Any]]:
    """``submit(fn, ...)`` for the cases' QC and writes: a second thread when overlapping, else a direct call.

    At most :data:`OVERLAP_PENDING` volumes wait for their check, so a slow disk holds a few volumes in
    memory, not a task's worth. The block's end waits for every submitted call; their errors surface
    from ``result()``.
    """
    if overlap is None:
        overlap = str(getattr(generator, "device", "cpu")).startswith("cuda")
    if not overlap:
        yield _Done
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor, wait

    pending: deque = deque()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctfactory-check") as pool:
        def submit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            while len(pending) >= OVERLAP_PENDING:
                wait([pending.popleft()])
            future = pool.submit(fn, *args, **kwargs)
            pending.append(future)
            return future

        yield submit


def _generate(generator: CaseGenerator, items: list[tuple[int, CaseRequest, Any, int]], batch_size: int | str
              ) -> Iterator[tuple[int, GeneratedVolume | CaseInputError, float]]:
    """Yield (case, volume or the input's error, seconds) for each item, in batches of one size and spacing."""
    from maisi_core.errors import MaisiError

    groups: dict[tuple, list[tuple[int, CaseRequest, Any, int]]] = {}
    for item in items:
        request = item[1]
        groups.setdefault((request.model_ref, request.output_size, request.spacing_mm,
                           request.num_inference_steps), []).append(item)
    for group in groups.values():
        size = _batch_size(generator, group[0][1], batch_size, len(group))
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            t0 = time.perf_counter()
            try:
                if len(chunk) == 1:
                    _, request, mask, seed = chunk[0]
                    volumes = [generator.generate(request, mask, seed=seed)]
                else:
                    volumes = generator.generate_batch([c[1] for c in chunk], [c[2] for c in chunk],  # type: ignore[attr-defined]
                                                       [c[3] for c in chunk])
            except MaisiError as exc:  # the model refused a mask (labels, geometry): an input, not a case failure
                if len(chunk) == 1:
                    yield chunk[0][0], CaseInputError(f"{chunk[0][1].sample_id}: generate: {exc}"), 0.0
                    continue
                yield from _generate(generator, chunk, 1)  # one at a time, to find which case it is
                continue
            share = (time.perf_counter() - t0) / len(chunk)
            for (i, *_), volume in zip(chunk, volumes, strict=True):
                yield i, volume, share


def _batch_size(generator: CaseGenerator, request: CaseRequest, batch_size: int | str, n: int) -> int:
    """Cases per batch for a group of ``n``: the runtime's number or the generator's suggestion for ``auto``."""
    if n == 1 or not hasattr(generator, "generate_batch"):
        return 1
    if batch_size == "auto":
        from maisi_core.engine.batching import MAX_AUTO_BATCH

        suggest = getattr(generator, "suggest_batch_size", None)
        return 1 if suggest is None else max(1, min(n, int(suggest(request, limit=min(n, MAX_AUTO_BATCH)))))
    return max(1, min(n, int(batch_size)))


def _check_and_write(case: _Attempts, generator: CaseGenerator, mask: Any, volume: GeneratedVolume, *, seed: int,
                     root: DatasetRoot, timings: dict[str, float], code_version: str, cpu_threads: int | None
                     ) -> SampleRecord | None:
    """QC one attempt's volume and write it; its record when it passes, None (and the next attempt) when not."""
    from maisi_core.io import save_image, save_label
    from maisi_core.evaluation.qc import check_case, check_written_geometry

    request, attempt = case.request, case.attempt
    case.batch_size = volume.batch_size
    t2 = time.perf_counter()
    qc = check_case(volume.image_hu, volume.label_map, affine=volume.affine, label_affine=mask.affine,
                    **qc_options(request, mask))
    t3 = time.perf_counter()
    case.last_failures, case.last_qc = tuple(f.message for f in qc.failures), _qc_fields(qc, request.tumor_label)
    if not qc.passed:
        case.reasons.append(f"attempt {attempt}: qc: {qc.summary()}")
        case.attempt += 1
        case.elapsed += t3 - t2
        return None
    image_uri, label_uri = root.resolve(request.image_uri), root.resolve(request.label_uri)
    image, _ = publish_volume(save_image, image_uri, volume.image_hu, volume.affine, root=root)
    label, _ = publish_volume(save_label, label_uri, volume.label_map, volume.affine, root=root)
    written = check_written_geometry(written_header(image_uri, root), written_header(label_uri, root),
                                     shape=request.output_size,
                                     affine=mask.affine, spacing_mm=request.spacing_mm)
    t4 = time.perf_counter()
    case.elapsed += t4 - t2
    if written:
        unpublish([image_uri, label_uri], root)
        case.last_failures = tuple(f.message for f in written)
        case.reasons.append(f"attempt {attempt}: qc: " + "; ".join(case.last_failures))
        case.attempt += 1
        return None
    timings = {**timings, "qc": t3 - t2, "write": t4 - t3,
               **{f"generate_{k}": v for k, v in volume.timings_s.items()}, "case_total": case.elapsed}
    placed = [t.diameter_mm for t in mask.tumors if t.label == request.tumor_label]
    return _record(request, generator, seed=seed, attempt=attempt, code_version=code_version, status="passed",
                   cpu_threads=cpu_threads, generation_batch=volume.batch_size,
                   qc_pass=True, tumor_size_mm=float(placed[0]) if placed else None,
                   mask_source=mask.mask_source, mask_id=mask.mask_id,
                   image_uri=request.image_uri, label_uri=request.label_uri,
                   image_sha256=image.sha256, label_sha256=label.sha256,
                   image_bytes=image.n_bytes, label_bytes=label.n_bytes,
                   timings_s=timings, **case.last_qc)


def _failed_record(case: _Attempts, generator: CaseGenerator, *, code_version: str, cpu_threads: int | None
                   ) -> SampleRecord:
    """The record of a case whose every attempt failed (nothing written)."""
    request, attempts = case.request, case.last_attempt
    logger.info("case %s failed after %d attempts: %s", request.sample_id, attempts + 1 - request.first_attempt,
                case.reasons[-1] if case.reasons else "")
    return _record(request, generator, seed=attempt_seed(request.seed, attempts), attempt=attempts,
                   code_version=code_version, status="failed", qc_pass=False, cpu_threads=cpu_threads,
                   generation_batch=case.batch_size, mask_source=request.mask_source.type,
                   qc_failures=case.last_failures, failure_reason=" | ".join(case.reasons)[:4000], **case.last_qc,
                   timings_s={"case_total": case.elapsed})
