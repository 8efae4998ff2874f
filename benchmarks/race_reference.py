"""Race ctfactory against NVIDIA's own NV-Generate-CTMR mask-to-CT script on the same GPU, weights and case.

Both sides take one synthetic label mask from disk and write one generated CT NIfTI to disk, with the same
random weights (ctfactory's ``maisi_ct_rflow`` preset, ``init_seed=0``, also written as upstream-format
``.pt`` checkpoints), size, spacing, rectified-flow steps, fp16 autocast, decode window/overlap and VAE
tensor splits. Each side runs in its own process: a warm-up run (same size, ``--warmup-steps`` steps, not
timed) and then the timed run, read mask -> load weights -> generate -> write, with peak GPU memory from
``torch.cuda.max_memory_allocated`` reset before the timed run. Goal (issue 16): ctfactory >= 1.5x faster
end to end at 512^3 with peak memory no higher.

    bash scripts/fetch_reference.sh [MIRROR]                  # NVIDIA's code, git-ignored, pinned da438fe
    python benchmarks/race_reference.py --size 512x512x512 --out /tmp/race

The upstream side is ``python -m scripts.infer_image_from_mask`` (CTMR, run from the reference folder),
called through :mod:`runpy` in a child process so that its stages and peak memory can be read; its code
is only wrapped with timers, never changed. CPU smoke test (upstream's script needs CUDA: there the
reference side only loads the exported checkpoints with upstream's own loader and checks they are ours):

    python benchmarks/race_reference.py --device cpu --preset tiny --size 32x32x32 --steps 2 \\
        --precision fp32 --decode-preset none --warmup-steps 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make maisi_core importable without installing
    sys.path.insert(0, str(REPO))

DEFAULT_REFERENCE_DIR = REPO / "benchmarks" / ".reference" / "NV-Generate-CTMR"
UPSTREAM_MODULE = "scripts.infer_image_from_mask"
GOAL_SIZE = (512, 512, 512)
GOAL_SPEEDUP = 1.5
SEED = 0
# upstream's file names (CTMR configs/environment_rflow-ct.json), so the written environment reads like theirs
UPSTREAM_FILES = {"vae": "autoencoder_v1.pt", "unet": "diff_unet_3d_rflow-ct.pt",
                  "controlnet": "controlnet_3d_rflow-ct.pt"}
TARGETS = {
    "autoencoder_def": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
    "diffusion_unet_def": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
    "controlnet_def": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
    "noise_scheduler": "monai.networks.schedulers.rectified_flow.RFlowScheduler",
}
STAGES = ("read_s", "load_s", "prepare_s", "denoise_s", "decode_s", "write_s", "total_s")


class RaceError(ValueError):
    """Raised when the race's arguments or inputs are invalid, or a side fails."""


# ------------------------------------------------------------------------------------------ arguments


def parse_size(text: str) -> tuple[int, int, int]:
    """``"512x512x512"`` -> (512, 512, 512)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise RaceError(f"race_reference expects a size like 512x512x512, but got size={text!r}.")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def parse_spacing(text: str) -> tuple[float, float, float]:
    """``"0.75x0.75x1.0"`` -> (0.75, 0.75, 1.0) mm."""
    try:
        values = tuple(float(p) for p in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise RaceError(f"race_reference expects a spacing in mm like 0.75x0.75x1.0, but got spacing={text!r}.")
    return values  # type: ignore[return-value]


UPSTREAM_XY, UPSTREAM_Z = (256, 384, 512), (128, 256, 384, 512, 640, 768)


def upstream_accepts(size, spacing) -> bool:
    """Whether CTMR's ``infer_image_from_mask`` takes this mask geometry as is (its ``_is_valid_target`` rule)."""
    return (size[0] == size[1] and size[0] in UPSTREAM_XY and size[2] in UPSTREAM_Z and spacing[0] == spacing[1]
            and 0.5 <= spacing[0] <= 3.0 and 0.5 <= spacing[2] <= 5.0)


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations the race cannot run."""
    if args.device.startswith("cuda") and args.precision != "fp16":
        print(json.dumps({"warning": "upstream always runs fp16 autocast; ctfactory runs " + args.precision}))
    if args.device == "cpu" and args.precision == "fp16":
        raise RaceError("race_reference expects --precision fp32 or bf16 with --device cpu, but got "
                        "precision='fp16'. fp16 autocast needs CUDA.")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise RaceError(f"race_reference expects --device cpu, cuda or cuda:N, but got device={args.device!r}.")
    if args.warmup_steps < 0 or args.steps < 1:
        raise RaceError(f"race_reference expects --steps >= 1 and --warmup-steps >= 0, but got steps={args.steps}, "
                        f"warmup_steps={args.warmup_steps}.")
    from maisi_core.engine.decoding import DECODE_PRESETS

    if args.decode_preset != "none" and args.decode_preset not in DECODE_PRESETS:
        raise RaceError(f"race_reference expects --decode-preset in {sorted(DECODE_PRESETS) + ['none']}, but got "
                        f"decode_preset={args.decode_preset!r}.")
    size, spacing = parse_size(args.size), parse_spacing(args.spacing)
    if args.device.startswith("cuda") and not upstream_accepts(size, spacing):
        raise RaceError(f"race_reference expects a size and spacing upstream's CLI takes as they are (x = y in "
                        f"{list(UPSTREAM_XY)}, z in {list(UPSTREAM_Z)}, spacing x = y in [0.5, 3], z in [0.5, 5] mm), "
                        f"but got size={args.size!r}, spacing={args.spacing!r}. Otherwise it resamples the mask and "
                        "the two sides would generate different volumes.")
    if not (Path(args.reference_dir) / "scripts" / "infer_image_from_mask.py").is_file():
        raise RaceError(f"race_reference expects NV-Generate-CTMR in --reference-dir, but got reference_dir="
                        f"{str(args.reference_dir)!r} without scripts/infer_image_from_mask.py. "
                        "Run: bash scripts/fetch_reference.sh [MIRROR]")


# ------------------------------------------------------------------------------------------ export


def upstream_network_config(config, *, num_splits: int, device_type: str) -> dict[str, Any]:
    """Our pipeline config as an upstream network config (``config_network_rflow.json`` layout).

    The VAE's ``num_splits`` is the decode preset's tensor-split count (upstream reads it from here; its
    ``infer_image_from_mask`` CLI ignores ``autoencoder_tp_num_splits``). Off CUDA the fp16 group norms and the
    UNet's flash attention are switched off, as ctfactory's builders do; neither changes the parameters.
    """
    from maisi_core.engine.networks import adapt_for_device

    if config.scheduler.name != "rflow":
        raise RaceError(f"upstream_network_config expects a rectified-flow preset, but got "
                        f"scheduler={config.scheduler.name!r}. Use --preset maisi_ct_rflow or tiny.")
    vae, unet, cnet = (adapt_for_device(c, device_type) for c in (config.vae.replace(num_splits=int(num_splits)),
                                                                  config.unet, config.controlnet))
    return {
        "spatial_dims": vae.spatial_dims,
        "image_channels": vae.in_channels,
        "latent_channels": vae.latent_channels,
        "include_body_region": config.conditioning == "body_region",
        "autoencoder_def": {"_target_": TARGETS["autoencoder_def"], **vae.to_kwargs()},
        "diffusion_unet_def": {"_target_": TARGETS["diffusion_unet_def"], **unet.to_kwargs()},
        "controlnet_def": {"_target_": TARGETS["controlnet_def"], **cnet.to_kwargs()},
        "noise_scheduler": {"_target_": TARGETS["noise_scheduler"], **config.scheduler.to_kwargs()},
    }


def save_upstream_checkpoints(pipe, dest: Path) -> dict[str, Path]:
    """Write the pipeline's weights in the layout upstream's ``load_image_models`` reads (MAISI.md §1).

    VAE: a raw state dict (loaded strictly). UNet: ``{"unet_state_dict", "scale_factor" (tensor)}``.
    ControlNet: ``{"controlnet_state_dict"}`` with *every* ControlNet key, so upstream's fill-from-UNet then
    ``strict=False`` load ends with exactly our ControlNet. Plain tensors only (``weights_only`` loadable).
    """
    import torch

    def plain(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    dest.mkdir(parents=True, exist_ok=True)
    paths = {comp: dest / name for comp, name in UPSTREAM_FILES.items()}
    torch.save(plain(pipe.vae), paths["vae"])
    torch.save({"unet_state_dict": plain(pipe.unet),
                "scale_factor": torch.tensor(float(pipe.scale_factor), dtype=torch.float32)}, paths["unet"])
    torch.save({"controlnet_state_dict": plain(pipe.controlnet)}, paths["controlnet"])
    return paths


def upstream_inference_config(*, size, spacing, steps: int, preset) -> dict[str, Any]:
    """An upstream inference config (``config_infer_80g_512x512x512.json`` keys) for one run."""
    return {
        "num_output_samples": 1, "num_inference_steps": int(steps), "output_size": list(size),
        "spacing": list(spacing), "image_output_ext": ".nii.gz", "label_output_ext": ".nii.gz",
        "autoencoder_sliding_window_infer_size": list(preset.roi_latent),
        "autoencoder_sliding_window_infer_overlap": preset.overlap,
        "autoencoder_tp_num_splits": preset.num_splits, "modality": 1, "cfg_guidance_scale": 0.0,
    }


def whole_volume_preset(config, size):
    """Decode settings when no memory preset is used: the preset's own window, overlap and splits."""
    from maisi_core.engine.decoding import DecodePreset

    lat = tuple(s // config.vae.downsample_factor for s in size)
    roi = config.decode_roi_latent or lat  # None: one window the size of the latent (decoded whole)
    return DecodePreset("none", tuple(roi), config.decode_overlap, config.vae.num_splits, 0)


def load_synthetic_label_map(size):
    """benchmarks/gpu.py's synthetic label map (body, liver, spleen, kidneys, lung lobes)."""
    spec = importlib.util.spec_from_file_location("_ctfactory_bench_gpu", Path(__file__).with_name("gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.synthetic_label_map(size)


def prepare_race(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Build the random pipeline, write both weight formats, the configs, the mask and the plan."""
    from maisi_core import MaisiPipeline, io, presets
    from maisi_core.engine.decoding import get_decode_preset
    from maisi_core.engine.weights import state_digest

    size, spacing = parse_size(args.size), parse_spacing(args.spacing)
    config = presets.get_preset(args.preset)
    if args.decode_preset == "none":
        preset = whole_volume_preset(config, size)
    else:
        preset = get_decode_preset(args.decode_preset)
    t0 = time.perf_counter()
    pipe = MaisiPipeline.from_config(config, device="cpu", precision="fp32", init_seed=SEED)
    digest = state_digest({"vae": pipe.vae, "unet": pipe.unet, "controlnet": pipe.controlnet})
    pipe.save_pretrained(out / "weights" / "ctfactory")
    ckpts = save_upstream_checkpoints(pipe, out / "weights" / "upstream")
    del pipe
    gc.collect()
    mask = out / "mask.nii.gz"
    io.save_label(mask, load_synthetic_label_map(size), io.affine_from_spacing(spacing, size))
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    net = out / "configs" / "config_network.json"
    _write_json(net, upstream_network_config(config, num_splits=preset.num_splits, device_type=device_type))
    runs = []
    for name, steps in (("warmup", args.warmup_steps), ("measured", args.steps)):
        if steps == 0:
            continue
        env = {"output_dir": str(out / "reference" / name),
               "trained_autoencoder_path": str(ckpts["vae"]), "trained_diffusion_path": str(ckpts["unet"]),
               "trained_controlnet_path": str(ckpts["controlnet"]),
               "label_dict_json": str(Path(args.reference_dir) / "configs" / "label_dict.json")}
        _write_json(out / "configs" / f"environment_{name}.json", env)
        _write_json(out / "configs" / f"config_infer_{name}.json",
                    upstream_inference_config(size=size, spacing=spacing, steps=steps, preset=preset))
        runs.append({"name": name, "steps": steps, "environment": str(out / "configs" / f"environment_{name}.json"),
                     "inference": str(out / "configs" / f"config_infer_{name}.json"),
                     "ours_output": str(out / "ctfactory" / name / "image.nii.gz")})
    return {
        "reference_dir": str(Path(args.reference_dir).resolve()), "mask": str(mask), "network_config": str(net),
        "model_dir": str(out / "weights" / "ctfactory"), "runs": runs, "device": device_type,
        "precision": args.precision, "decode_preset": None if args.decode_preset == "none" else args.decode_preset,
        "match_cudnn": args.match_cudnn, "weights_digest": digest, "size": list(size), "spacing": list(spacing),
        "preset": args.preset, "export_s": round(time.perf_counter() - t0, 3),
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------------ children


def _sync(device_type: str):
    import torch

    return torch.cuda.synchronize if device_type == "cuda" else (lambda: None)


def _timed(fn, stamps: dict[str, float], name: str, sync):
    """Wrap ``fn`` so that synchronised perf_counter stamps ``<name>_start``/``<name>_end`` are recorded."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        sync()
        stamps[f"{name}_start"] = time.perf_counter()
        result = fn(*a, **k)
        sync()
        stamps[f"{name}_end"] = time.perf_counter()
        return result
    return wrapper


@contextlib.contextmanager
def _measure_memory(device_type: str, record: dict[str, Any]):
    """Reset the CUDA peak counters before, read them after (GiB)."""
    import torch

    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        record["baseline_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    yield
    if device_type == "cuda":
        torch.cuda.synchronize()
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


def import_upstream(reference_dir: str | Path):
    """Import upstream's ``scripts.utils_infer`` from the reference folder (its ``scripts`` package first)."""
    ref = str(Path(reference_dir).resolve())
    if ref not in sys.path:
        sys.path.insert(0, ref)
    import importlib

    return importlib.import_module("scripts.utils_infer")


def load_with_upstream_loader(reference_dir, network_config: str, environment: str, inference: str,
                              device: str = "cpu"):
    """Load the exported checkpoints exactly as upstream's CLI does (its ``load_config`` + ``load_image_models``).

    Returns:
        (vae, unet, controlnet, scale_factor) as upstream builds and fills them.
    """
    import torch

    utils_infer = import_upstream(reference_dir)
    from scripts.diff_model_setting import load_config  # upstream's, from the reference folder

    cfg = load_config(environment, inference, network_config)
    vae, unet, cnet, scale, _scheduler = utils_infer.load_image_models(cfg, torch.device(device))
    return vae, unet, cnet, float(scale)


def run_reference_child(plan: dict[str, Any]) -> dict[str, Any]:
    """Upstream's mask-to-CT CLI, warm-up then timed, in this process (cwd: the reference folder)."""
    from maisi_core.engine.weights import state_digest

    device_type = plan["device"]
    if device_type != "cuda":
        return _reference_load_only(plan)
    os.chdir(plan["reference_dir"])
    ui = import_upstream(plan["reference_dir"])
    sync = _sync(device_type)
    stamps: dict[str, float] = {}
    checked: dict[str, Any] = {"weights_digest": None}  # None: not checked (no warm-up run)
    load = ui.load_image_models

    def load_and_check(*a, **k):
        models = load(*a, **k)
        if stamps.get("check_weights"):  # the warm-up run only, so the timed run never pays for it
            checked["weights_digest"] = state_digest(dict(zip(("vae", "unet", "controlnet"), models[:3])))
        return models

    ui.load_image_models = _timed(load_and_check, stamps, "load", sync)
    ui.run_controlnet_conditioned_image_dm = _timed(ui.run_controlnet_conditioned_image_dm, stamps, "core", sync)
    ui.dynamic_infer = _timed(ui.dynamic_infer, stamps, "decode", sync)
    runs = []
    for run in plan["runs"]:
        argv = [UPSTREAM_MODULE, "--mask", plan["mask"], "-t", plan["network_config"], "-e", run["environment"],
                "-i", run["inference"], "--random-seed", str(SEED)]
        record: dict[str, Any] = {"name": run["name"], "steps": run["steps"]}
        stamps.clear()
        stamps["check_weights"] = run["name"] == "warmup"
        saved_argv, sys.argv = sys.argv, argv
        try:
            with _measure_memory(device_type, record):
                t0 = time.perf_counter()
                code = _run_module_main(UPSTREAM_MODULE)
                sync()
                t1 = time.perf_counter()
        finally:
            sys.argv = saved_argv
        if code not in (0, None):
            raise RaceError(f"run_reference_child expects {UPSTREAM_MODULE} to exit 0, but got exit code={code!r}.")
        record.update(_reference_stages(stamps, t0, t1))
        outputs = sorted(Path(json.loads(Path(run["environment"]).read_text())["output_dir"]).glob("*_image.nii.gz"))
        record["output"] = str(outputs[-1]) if outputs else None
        runs.append(record)
    return {"side": "reference", "mode": "end-to-end", "runs": runs, **checked, **_environment_facts()}


def _run_module_main(module: str):
    """``python -m module`` inside this process; return its exit code."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code
    return 0


def _reference_stages(s: dict[str, float], t0: float, t1: float) -> dict[str, float]:
    """Stages from the wrapper stamps: read = CLI start to model loading (argparse, mask validation)."""
    return {
        "read_s": s["load_start"] - t0,
        "load_s": s["load_end"] - s["load_start"],
        "prepare_s": s["core_start"] - s["load_end"],  # conditioning tensors, 8-bit mask encoding
        "denoise_s": s["decode_start"] - s["core_start"],
        "decode_s": s["decode_end"] - s["decode_start"],
        "write_s": t1 - s["decode_end"],  # clip, HU mapping, background from the mask, SaveImage
        "total_s": t1 - t0,
    }


def _reference_load_only(plan: dict[str, Any]) -> dict[str, Any]:
    """CPU: upstream's script needs CUDA (fp16 latents, fp16 norms, flash attention), so only load the weights."""
    from maisi_core.engine.weights import state_digest

    run = plan["runs"][-1]
    t0 = time.perf_counter()
    vae, unet, cnet, scale = load_with_upstream_loader(plan["reference_dir"], plan["network_config"],
                                                       run["environment"], run["inference"])
    load_s = time.perf_counter() - t0
    digest = state_digest({"vae": vae, "unet": unet, "controlnet": cnet})
    return {"side": "reference", "mode": "load-only (CPU: upstream's script needs CUDA)",
            "runs": [{"name": "load", "steps": 0, "load_s": load_s, "scale_factor": scale}],
            "weights_digest": digest, **_environment_facts()}


def run_ours_child(plan: dict[str, Any]) -> dict[str, Any]:
    """ctfactory: read the mask, load the model directory, generate, write; warm-up then timed."""
    import torch
    from maisi_core import MaisiPipeline, io
    from maisi_core.engine.weights import state_digest

    device_type = plan["device"]
    if plan["match_cudnn"]:  # what upstream's set_determinism(seed) leaves behind
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    sync = _sync(device_type)
    runs, digest = [], None
    for run in plan["runs"]:
        record: dict[str, Any] = {"name": run["name"], "steps": run["steps"]}
        stamps: dict[str, float] = {}
        with _measure_memory(device_type, record):
            t0 = time.perf_counter()
            vol = io.load_label(plan["mask"])
            t_read = time.perf_counter()
            pipe = MaisiPipeline.from_pretrained(plan["model_dir"], device=device_type, precision=plan["precision"],
                                                 decode_preset=plan["decode_preset"])
            sync()
            t_load = time.perf_counter()
            # stage boundaries synchronised, as on the reference side (the pipeline's own clocks do not sync):
            # after the last preparing step (the mask embedding, or the guidance branch in older pipelines)
            # and after the denoising loop
            last = "embed_conditions" if hasattr(pipe, "embed_conditions") else "prepare_guidance"
            setattr(pipe, last, _timed(getattr(pipe, last), stamps, "prepare", sync))
            pipe.denoise = _timed(pipe.denoise, stamps, "denoise", sync)
            out = pipe.generate(vol.array, spacing_mm=vol.spacing_mm, seed=SEED, num_inference_steps=run["steps"],
                                affine=vol.affine)
            t_gen = time.perf_counter()
            Path(run["ours_output"]).parent.mkdir(parents=True, exist_ok=True)
            io.save_image(run["ours_output"], out.image, out.affine, modality=out.modality, overwrite=True)
            sync()
            t1 = time.perf_counter()
        tm = out.timings_s
        record.update({"read_s": t_read - t0, "load_s": t_load - t_read, "prepare_s": tm["prepare"],
                       "denoise_s": tm["denoise"], "decode_s": tm["decode"],
                       "write_s": tm["postprocess"] + (t1 - t_gen), "total_s": t1 - t0, "output": run["ours_output"]})
        if digest is None:  # after the timed region
            digest = state_digest({"vae": pipe.vae, "unet": pipe.unet, "controlnet": pipe.controlnet})
        runs.append(record)
        del pipe, out
    return {"side": "ctfactory", "mode": "end-to-end", "runs": runs, "weights_digest": digest, **_environment_facts()}


def _environment_facts() -> dict[str, Any]:
    import monai
    import torch

    facts = {"torch": torch.__version__, "monai": monai.__version__,
             "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
             "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
             "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


# ------------------------------------------------------------------------------------------ parent


class SmiPoller:
    """Poll ``nvidia-smi`` memory.used (MiB) while a child runs; the peak covers the whole child process."""

    def __init__(self, gpu_index: str) -> None:
        self.peak_mib: float | None = None
        self._proc = None
        self._gpu = gpu_index

    def __enter__(self) -> SmiPoller:
        exe = shutil.which("nvidia-smi")
        if exe:
            self._proc = subprocess.Popen([exe, "-i", self._gpu, "--query-gpu=memory.used",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            with contextlib.suppress(ValueError):
                value = float(line.strip())
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=5)


def run_child(side: str, plan_path: Path, gpu_index: str | None) -> dict[str, Any]:
    """Run one side in a fresh Python process and return its result (plus process wall time and nvidia-smi peak)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if gpu_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu_index
    result_path = plan_path.with_name(f"result_{side}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--plan", str(plan_path),
           "--child-result", str(result_path)]
    t0 = time.perf_counter()
    with SmiPoller(gpu_index or "0") if gpu_index is not None else contextlib.nullcontext() as smi:
        proc = subprocess.run(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = plan_path.with_name(f"log_{side}.txt")
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise RaceError(f"run_child expects the {side} side to exit 0, but got returncode={proc.returncode}. "
                        f"Log: {log}\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - t0
    result["smi_peak_mib"] = getattr(smi, "peak_mib", None)
    return result


def compare(reference: dict[str, Any], ours: dict[str, Any], *, size, precision: str, device: str,
            exported_digest: str | None = None) -> dict[str, Any]:
    """Ratios of the timed runs and the goal verdict (ctfactory vs reference)."""
    ref, own = reference["runs"][-1], ours["runs"][-1]
    row: dict[str, Any] = {"kind": "comparison", "size": "x".join(map(str, size)), "precision": precision}
    if reference["mode"] == "end-to-end":
        row["speedup"] = ref["total_s"] / own["total_s"]
        if "peak_allocated_gib" in ref and "peak_allocated_gib" in own:
            row["peak_memory_ratio"] = own["peak_allocated_gib"] / ref["peak_allocated_gib"]
    digests = (reference.get("weights_digest"), ours.get("weights_digest"),
               exported_digest or ours.get("weights_digest"))
    row["weights_identical"] = None if None in digests else len(set(digests)) == 1  # None: not checked
    row["goal"] = goal_verdict(row.get("speedup"), row.get("peak_memory_ratio"), size=tuple(size),
                               precision=precision, device=device)
    return row


def goal_verdict(speedup: float | None, memory_ratio: float | None, *, size, precision: str, device: str) -> str:
    """PASS/MISS for issue 16's goal (>= 1.5x faster end to end at 512^3, peak memory no higher), or why n/a."""
    if not device.startswith("cuda") or speedup is None or memory_ratio is None:
        return "n/a: not measured (needs both sides end to end on CUDA)"
    if tuple(size) != GOAL_SIZE or precision != "fp16":
        return "n/a: the goal is defined at 512x512x512 with fp16 (upstream's precision)"
    misses = []
    if speedup < GOAL_SPEEDUP:
        misses.append(f"speed-up {speedup:.2f}x < {GOAL_SPEEDUP}x")
    if memory_ratio > 1.0:
        misses.append(f"peak memory {memory_ratio:.3f}x the reference's")
    return "MISS: " + "; ".join(misses) if misses else "PASS"


def format_table(reference: dict[str, Any], ours: dict[str, Any]) -> str:
    """Side-by-side stage times (s) and peak memory (GiB) of the timed runs, with reference/ours ratios."""
    ref, own = reference["runs"][-1], ours["runs"][-1]
    like_for_like = reference["mode"] == "end-to-end"  # a load-only reference (CPU) is not compared
    lines = [f"{'':22}{'reference':>12}{'ctfactory':>12}{'ref/ours':>10}"]
    keys = [*STAGES, "peak_allocated_gib", "peak_reserved_gib", "smi_peak_mib"]
    for key in keys:
        a = ref.get(key, reference.get(key))
        b = own.get(key, ours.get(key))
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
        ratio = f"{a / b:10.2f}" if like_for_like and numbers else f"{'-':>10}"
        fa = f"{a:12.2f}" if isinstance(a, (int, float)) else f"{'-':>12}"
        fb = f"{b:12.2f}" if isinstance(b, (int, float)) else f"{'-':>12}"
        lines.append(f"{key:22}{fa}{fb}{ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512x512x512")
    ap.add_argument("--spacing", default="0.75x0.75x1.0", help="mm; upstream's 512^3 configs use 0.75x0.75x1.0")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps of the untimed warm-up run of each side (0: none)")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="ctfactory's; upstream: fp16")
    ap.add_argument("--decode-preset", default="80g", help="16g, 24g, 32g, 80g or none (the preset's own window)")
    ap.add_argument("--preset", default="maisi_ct_rflow", help="network preset: maisi_ct_rflow, or tiny (CPU smoke)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference-dir", default=str(DEFAULT_REFERENCE_DIR))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "race_reference"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--match-cudnn", action="store_true",
                    help="give ctfactory upstream's cuDNN flags (deterministic on, benchmark off)")
    ap.add_argument("--child", choices=["reference", "ctfactory"], help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        plan = json.loads(Path(args.plan).read_text())
        result = (run_reference_child if args.child == "reference" else run_ours_child)(plan)
        Path(args.child_result).write_text(json.dumps(result))
        return 0
    check_args(args)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise RaceError(f"race_reference expects an empty or new --out, but got out={str(out)!r} with files in it. "
                            "Pass --overwrite or choose another folder.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = prepare_race(args, out)
    plan_path = out / "plan.json"
    _write_json(plan_path, plan)
    gpu = (args.device.split(":")[1] if ":" in args.device else "0") if plan["device"] == "cuda" else None
    reference = run_child("reference", plan_path, gpu)
    ours = run_child("ctfactory", plan_path, gpu)
    summary = compare(reference, ours, size=plan["size"], precision=args.precision, device=args.device,
                      exported_digest=plan["weights_digest"])
    rows = [{"kind": "plan", **{k: plan[k] for k in ("size", "spacing", "preset", "precision", "decode_preset",
                                                       "match_cudnn", "export_s")},
             "steps": args.steps, "warmup_steps": args.warmup_steps, "warmup_excluded": True},
            {"kind": "side", **reference}, {"kind": "side", **ours}, summary]
    with open(out / "race.jsonl", "w") as fh:
        for row in rows:
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")
    print()
    print(format_table(reference, ours))
    if "speedup" in summary:
        print(f"speed-up (reference total / ctfactory total): {summary['speedup']:.2f}x; "
              f"peak memory ratio (ctfactory / reference): {summary.get('peak_memory_ratio', float('nan')):.3f}")
    print(f"weights identical on both sides: {summary['weights_identical']}")
    print(f"goal (>= {GOAL_SPEEDUP}x faster at 512^3, peak memory no higher): {summary['goal']}")
    return 1 if summary["weights_identical"] is False else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RaceError, ValueError) as exc:  # RaceError and maisi_core's ConfigError/GeometryError
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
