"""GPU throughput in one run: course CLIP against open_clip (eager and compiled), then the WRA solvers.

    python3 benchmarks/gpu_throughput.py --profile                      # on the GPU: gpu-base, batch 256
    python3 benchmarks/gpu_throughput.py --size cpu-tiny --device cpu --steps 2 --warmup 1 \\
        --batch 4 --compile-backend aot_eager                           # the CPU smoke test (seconds)

Issue 16. Four training configurations run in this order, in one process, through ONE timing loop
(:func:`time_steps`): ``course-eager``, ``course-compiled``, ``open_clip-eager``,
``open_clip-compiled``; then ``benchmarks/bench_wra.py --device <same device>``. Each prints its row
as soon as it is done; the end prints one markdown table (samples/s, ms/step, MFU, peak memory), the
targets' verdicts and the exact command to reproduce. With ``--out DIR`` (default: ``$OUT`` when it
is set, as on the device machine) the report is also written to ``DIR/gpu_throughput.md`` and
``DIR/gpu_throughput.json``.

The same settings for every configuration:
- the model: the ``--size`` preset of ``course_lib.presets``; ``gpu-base`` is ViT-B/16 at 224 px + a
  12-layer text transformer of width 512, embed 512, context 77. The course model gets open_clip's
  vocabulary (49,408 tokens at gpu-base): its 25M-parameter token embedding is updated by AdamW in
  every step, so leaving it at the course's 256 tokens would flatter the course. open_clip's side
  at gpu-base is ``open_clip.create_model("ViT-B-16")`` itself (random init, no download), at other
  sizes an ``open_clip.CLIP`` built from the same preset;
- the data: ``--batch`` synthetic pairs (random images, normal(0, 1) like normalised pixels; random
  token ids, caption lengths 8..context, the end-of-text token ``vocab - 1`` last: open_clip pools at
  the largest id, the course at the last real token), two batches made on the device before any
  timing and alternated, so the data pipeline is not measured (open_clip_train's own synthetic
  mode feeds one constant black image through DataLoader workers);
- the step: ``zero_grad``, forward + loss under bf16 autocast (CUDA only; CPUs compute in float32),
  ``backward``, ``course_lib.train.make_optimizer`` (AdamW, weight decay on 2-d weights, the fused
  CUDA kernel on GPUs), and open_clip_train's ``logit_scale.clamp_(0, ln 100)`` after the step for
  open_clip (the course model clamps at the start of its forward); TF32 on and
  ``cudnn.benchmark`` as open_clip_train sets them. "compiled" is ``torch.compile(model)``: for the
  course the model with its loss inside, for open_clip the model only, as ``open_clip_train.main
  --torchcompile`` does;
- the timing: ``--warmup`` steps (compilation, autotuning, allocator warm-up) are run and excluded;
  then ``torch.cuda.synchronize()``, the clock, ``--steps`` steps with nothing that waits for the
  device in between (per-step CUDA events only record), ``synchronize()``, the clock. samples/s =
  batch x steps / that time; ms/step is the median of the per-step event times. The loss is read
  once, after the timed region, and must be finite;
- MFU: ``course_lib.flops``: training FLOPs = 3 x one forward counted by ``FlopCounterMode`` (each
  model its own count; ViT-B/16 + text: 41.1 GFLOPs forward), over the device's dense bf16 peak
  (``course_lib.flops.PEAK_FLOPS``: 989 TFLOP/s for H100 SXM and H200);
- peak memory: ``torch.cuda.max_memory_allocated`` from the model's construction to the end of its
  timing (the two data batches included: 0.31 GB at gpu-base); on a CPU the process's peak RSS so far.

Each configuration runs in its own ``try``: a failure (or a missing open_clip) is a row saying so,
and the rest still run. ``--budget-s`` skips configurations that would start after that many seconds
(the device tool stops a command at 10 minutes; a skipped row says so). ``--profile`` runs
``torch.profiler`` over ``--profile-steps`` steps of the course step (eager and compiled, after
their timing) and prints its top entries by device time, a breakdown of the device time by kind
of kernel, and how busy the GPU was over those steps.

Packages the GPU machine lacks come from wheels in ``benchmarks/wheels/`` (git-ignored; carried to
the device machine with the ``run`` tool's ``carry``), installed with ``pip install --no-index
--no-deps --target`` into ``--site`` (default /tmp/gpu_throughput_site) only when the module does not
import already; torch, torchvision, numpy, scipy, timm, regex, tqdm, huggingface_hub and
safetensors are the machine's own (torch 2.11 + cu130 there; a torch wheel is never installed from
that folder). The wheels, fetched with ``pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform
manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d
benchmarks/wheels NAME==VERSION``:

=============================================================  =========  ==========================
wheel                                                          size       why
=============================================================  =========  ==========================
open_clip_torch-3.3.0-py3-none-any.whl                         1.5 MB     the baseline (open_clip and
                                                                          open_clip_train)
ftfy-6.3.1-py3-none-any.whl                                    45 kB      open_clip's tokenizer module
                                                                          imports it
wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64...whl            0.8 MB     ftfy's one dependency
pot-0.9.7.post1-cp312-cp312-manylinux_2_27_x86_64...whl        33 MB      POT: bench_wra's exact
                                                                          ``ot.emd2`` and
                                                                          ``ot.batch.solve_batch``
webdataset-0.2.86-py3-none-any.whl                             70 kB      only for
                                                                          ``--open-clip-train``
                                                                          (open_clip_train.data
                                                                          imports it; <= 0.2.86)
braceexpand-0.1.7-py2.py3-none-any.whl                         6 kB       webdataset's dependency
=============================================================  =========  ==========================

(timm >= 1.0.17 is in open_clip's requirements but only its timm-tower models import it; the
machine has timm anyway. pandas and fsspec, for ``--open-clip-train``, are the machine's.)

``--open-clip-train eager|compiled`` adds a cross-check: ``python -m open_clip_train.main
--dataset-type synthetic --model ViT-B-16 --batch-size 256 --precision amp_bf16 [--torchcompile]``
in a subprocess (its own loop, DataLoader workers and constant images), the last logged
samples/s/gpu reported as one more row.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from the repository root (the device machine has no install)
    sys.path.insert(0, str(ROOT))
WHEELS = ROOT / "benchmarks" / "wheels"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "gpu_throughput_site"

CONFIGS = ("course-eager", "course-compiled", "open_clip-eager", "open_clip-compiled")
EXTRA_CONFIGS = ("course-compiled-cudagraphs",)  # opt-in: torch.compile(mode="reduce-overhead")
OPEN_CLIP_VOCAB = 49408  # ViT-B-16's text vocabulary (open_clip's SimpleTokenizer)
TARGET_SPEEDUP = 1.15  # course compiled / open_clip compiled, the issue's target
TARGET_MFU = 0.36
TARGET_WRA_SPEEDUP = 10.0  # IPOT (UNITER's setting) against the exact emd2 loop, at <= 1% error
# wheel file name prefix (lower case) -> the module it provides; a wheel is installed only when its
# module does not import. Never torch: the machine's own CUDA build is the one measured.
WHEEL_MODULES = {"open_clip_torch": "open_clip", "ftfy": "ftfy", "wcwidth": "wcwidth", "pot": "ot",
                 "webdataset": "webdataset", "braceexpand": "braceexpand"}
NEEDS = {"open_clip": ("open_clip_torch", "ftfy", "wcwidth"), "ot": ("pot",),
         "open_clip_train": ("open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand")}


# --------------------------------------------------------------------------- packages


def _wheel_for(prefix: str, wheels: Path) -> Path | None:
    for path in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        name = path.name.lower().replace("-", "_")
        if name.startswith(prefix + "_") and not name.startswith("torch"):
            return path
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def ensure_module(module: str, site: Path, wheels: Path = WHEELS, install: bool = True,
                  needs: dict[str, str] | None = None) -> str:
    """Make ``module`` importable: installs the wheels it needs (``needs``: wheel name prefix -> the
    module it provides; default from ``NEEDS``) whose modules do not import, from ``wheels`` into
    ``site`` (prepended to ``sys.path`` and ``PYTHONPATH``). Returns a note: "present",
    "installed from ..." or why it is still missing (never raises)."""
    if _importable(module):
        return "present"
    if not install:
        return f"{module} is not importable and --no-install was given"
    if needs is None:
        needs = {p: WHEEL_MODULES[p] for p in NEEDS.get(module, ())}
    missing = [p for p, provides in needs.items() if not _importable(provides)]
    found = {p: _wheel_for(p, wheels) for p in missing}
    absent = [p for p, w in found.items() if w is None]
    if absent or not found:
        folder = wheels.relative_to(ROOT) if wheels.is_relative_to(ROOT) else wheels
        return f"{module} is not importable and {folder} has no wheel for {', '.join(absent) or module}"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site),
               *map(str, found.values())]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        return f"pip could not install {', '.join(w.name for w in found.values())}: {proc.stderr.strip()[-300:]}"
    add_site(site)
    if not _importable(module):
        return f"{module} is still not importable after installing into {site}"
    return "installed from " + ", ".join(w.name for w in found.values())


def add_site(site: Path) -> None:
    """Put ``site`` first on ``sys.path`` and on ``PYTHONPATH`` (for the subprocesses)."""
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for entry in (str(ROOT), str(site)):
        if entry not in parts:
            parts.insert(0, entry)
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    importlib.invalidate_caches()


# --------------------------------------------------------------------------- rows and timing


@dataclass
class Row:
    name: str
    status: str = "ok"  # "ok", "skipped", "FAILED"
    samples_per_s: float | None = None
    ms_per_step: float | None = None  # median of the timed steps
    ms_spread: str = ""  # min-max of the timed steps
    mfu: float | None = None
    gflops_per_sample: float | None = None  # training: 3 x forward
    peak_mem_gib: float | None = None
    params_m: float | None = None
    warmup_s: float | None = None  # the warm-up steps, compilation included
    loss: float | None = None
    note: str = ""


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> dict:
    """Run ``warmup`` steps (excluded), then ``steps`` timed steps. Nothing waits for the device
    inside the timed region: per-step CUDA events are only recorded there and read after the final
    ``synchronize``. ``step()`` returns the step's loss (a device tensor, detached)."""
    start = time.perf_counter()
    loss = None
    for _ in range(warmup):
        loss = step()
    sync(device)
    warmup_s = time.perf_counter() - start
    cuda = device.type == "cuda"
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else [0.0] * (steps + 1)
    sync(device)
    start = time.perf_counter()
    if cuda:
        marks[0].record()
    else:
        marks[0] = start
    for i in range(steps):
        loss = step()
        if cuda:
            marks[i + 1].record()
        else:
            marks[i + 1] = time.perf_counter()
    sync(device)
    seconds = time.perf_counter() - start
    if cuda:
        per_step = [marks[i].elapsed_time(marks[i + 1]) for i in range(steps)]
    else:
        per_step = [1e3 * (marks[i + 1] - marks[i]) for i in range(steps)]
    return {"seconds": seconds, "per_step_ms": per_step, "warmup_s": warmup_s,
            "loss": float(loss) if loss is not None else float("nan")}


def make_step(loss_fn, optimizer, batches, autocast, after_step=None, mark_step=None):
    """One training step over the next batch: zero_grad, forward + loss (autocast), backward, optimizer
    step, ``after_step`` (e.g. the logit-scale clamp). Returns the detached loss (no host read)."""
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        if mark_step is not None:
            mark_step()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        return loss.detach()

    return step


def synthetic_batches(n: int, batch: int, image_size: int, context: int, vocab: int, device, seed: int = 0):
    """``n`` batches of random images (B, 3, S, S) and captions of 8..context tokens ending in the
    end-of-text id ``vocab - 1`` (the largest id: open_clip pools there), zero-padded, with their mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, image_size, image_size, generator=g)
        lengths = torch.randint(min(8, context), context + 1, (batch,), generator=g)
        ids = torch.randint(1, vocab - 1, (batch, context), generator=g)
        positions = torch.arange(context)[None, :]
        ids[positions == (lengths - 1)[:, None]] = vocab - 1
        mask = (positions < lengths[:, None]).long()
        ids = ids * mask
        out.append({"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return out


# --------------------------------------------------------------------------- the models


def course_config(size: str, vocab: int):
    from course_lib.models.clip import CLIPConfig
    return CLIPConfig.from_preset(size, vocab_size=vocab)


class OpenCLIPLoss:
    """open_clip's model + ``ClipLoss`` as one callable on the course's batch dict; ``runner`` is the
    model or its compiled wrapper (open_clip_train compiles the model, not the loss)."""

    def __init__(self, model, runner):
        import open_clip
        self.model, self.runner, self.loss = model, runner, open_clip.ClipLoss()

    def __call__(self, batch):
        out = self.runner(batch["images"], batch["input_ids"])
        return self.loss(out["image_features"], out["text_features"], out["logit_scale"])


def build_open_clip(cfg, size: str):
    """open_clip's CLIP of the same size as course config ``cfg``: ``ViT-B-16`` itself at gpu-base."""
    import open_clip

    vision = dict(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
                  mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size, image_size=cfg.image_size)
    text = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio)
    if size == "gpu-base":
        reference = open_clip.get_model_config("ViT-B-16")
        differ = {f"vision.{k}": (v, reference["vision_cfg"].get(k)) for k, v in vision.items()
                  if k in reference["vision_cfg"] and reference["vision_cfg"][k] != v}
        differ.update({f"text.{k}": (v, reference["text_cfg"].get(k)) for k, v in text.items()
                       if k in reference["text_cfg"] and reference["text_cfg"][k] != v})
        if reference["embed_dim"] != cfg.embed_dim:
            differ["embed_dim"] = (cfg.embed_dim, reference["embed_dim"])
        if differ:
            raise ValueError(f"gpu-base differs from open_clip's ViT-B-16 (course, open_clip): {differ}")
        return open_clip.create_model("ViT-B-16", pretrained=None, output_dict=True)
    return open_clip.CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True)


class Counted(torch.nn.Module):
    """``loss_fn`` as a module holding ``model``, for ``course_lib.flops`` (which counts ``module(batch)``
    in eval mode: ``model`` is a submodule, so it is put in eval mode too)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


# --------------------------------------------------------------------------- profiler

KERNEL_KINDS = (  # (kind, regex over the lower-cased kernel name): the first that matches wins, so
    # attention (cuDNN's and CUTLASS's FMHA names hold "sm90"/"cutlass") and convolution (cuDNN's
    # "implicit_gemm") come before the matrix products, and Triton's matmul templates before Triton
    ("attention (flash / mem-efficient / cuDNN)", r"flash|fmha|attention|sdpa|attn"),
    ("convolution (patch embedding)", r"conv|fprop|dgrad|wgrad|implicit"),
    ("matrix products (cuBLAS/CUTLASS/Triton mm)", r"gemm|xmma|cutlass|nvjet|wgmma|sm90_|sm80_|cublas|matmul|_mm_|"
                                                   r"_addmm|_bmm|splitk|triton_tem"),
    ("optimizer (fused AdamW, foreach)", r"adam|multi_tensor|foreach"),
    ("Triton (compiled fusions)", r"triton"),
    ("copies and fills", r"memcpy|memset|copy|fill"),
    ("norms, softmax, reductions", r"norm|softmax|reduce|cross_entropy|nll"),
    ("other elementwise", r"elementwise|vectorized|unrolled|kernel"),
)


def kernel_breakdown(averages, steps: int, wall_ms: float) -> list[str]:
    """Device time by kind of kernel (``KERNEL_KINDS``) from the profiler's ``key_averages()``
    entries that ran on a GPU, per step, and the kernels' busy share of ``wall_ms``."""
    kinds: dict[str, float] = {}
    for event in averages:
        if not str(getattr(event, "device_type", "")).endswith("CUDA"):
            continue
        us = float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, event.key.lower())), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    total = sum(kinds.values())
    if not total:
        return ["(the profiler recorded no GPU kernels)"]
    lines = [f"device time by kind of kernel, {steps} steps in {wall_ms:.1f} ms of wall time; kernels busy "
             f"{100 * total / 1e3 / wall_ms:.1f}% of it ({total / 1e3 / steps:.2f} ms of kernels per step):"]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<45} {us / 1e3 / steps:8.2f} ms/step  {100 * us / total:5.1f}%")
    return lines


def profile_step(step, device, steps: int, top: int = 20, trace: Path | None = None) -> str:
    """``torch.profiler`` over ``steps`` steps of ``step`` (already warm): the top entries by self
    device time (self CPU time on a CPU), device time by kind of kernel, and the GPU's busy share.
    ``trace``: also write the Chrome trace there, gzipped (skipped when over 15 MiB)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - start)
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [averages.table(sort_by=sort, row_limit=top)]
    if device.type == "cuda":
        lines += kernel_breakdown(averages, steps, wall_ms)
    else:
        lines.append(f"{steps} steps, {wall_ms:.1f} ms of wall time (CPU: no device kernels)")
    if trace is not None:
        lines.append(_write_trace(prof, trace))
    return "\n".join(lines)


def _write_trace(prof, path: Path) -> str:
    import gzip
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix("")  # x.json.gz -> x.json
    try:
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(path, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
    finally:
        raw.unlink(missing_ok=True)
    size = path.stat().st_size
    if size > 15 * 2**20:  # the device tool brings back files of 16 MiB at most
        path.unlink()
        return f"trace not kept: {size / 2**20:.1f} MiB gzipped"
    return f"trace: {path} ({size / 2**20:.1f} MiB; open in chrome://tracing or ui.perfetto.dev)"


# --------------------------------------------------------------------------- one configuration


def run_config(name: str, args, device, batches, profiles: dict) -> Row:
    """Build, warm up, time (and maybe profile) configuration ``name``; never raises."""
    from course_lib.flops import mfu, model_flops_per_sample, peak_memory_gib
    from course_lib.train import TrainConfig, make_optimizer

    row = Row(name)
    family, _, variant = name.partition("-")
    compiled = variant.startswith("compiled")
    cudagraphs = variant.endswith("cudagraphs")
    model = runner = optimizer = step = None
    try:
        if family == "open_clip":
            note = ensure_module("open_clip", args.site, args.wheels, install=not args.no_install)
            if not _importable("open_clip"):
                return Row(name, status="skipped", note=note)
            try:
                import open_clip  # noqa: F401
            except Exception as error:  # noqa: BLE001 (e.g. a torchvision that does not match torch)
                why = f"import open_clip failed: {type(error).__name__}: {error}"
                return Row(name, status="skipped", note=why[:300])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(args.seed)
        cfg = course_config(args.size, args.vocab)
        if family == "course":
            from course_lib.models.clip import CLIP
            model = CLIP(cfg).to(device)
            loss_of = lambda r: (lambda batch: r(batch)["loss"])  # noqa: E731
            after_step = None  # the course model clamps its logit scale at the start of its forward
        else:
            import open_clip
            model = build_open_clip(cfg, args.size).to(device)
            loss_of = lambda r: OpenCLIPLoss(model, r)  # noqa: E731

            def after_step():  # open_clip_train, after each optimizer step
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            row.note = f"open_clip {open_clip.__version__}"
        model.train()
        row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            counted = Counted(model, loss_of(model))
            flops = model_flops_per_sample(counted, {k: v[:2] for k, v in batches[0].items()})
        row.gflops_per_sample = flops / 1e9
        mode = "reduce-overhead" if cudagraphs else None
        runner = torch.compile(model, backend=args.compile_backend, mode=mode) if compiled else model
        optimizer = make_optimizer(model, TrainConfig(steps=args.warmup + args.steps, lr=args.lr, weight_decay=0.1))
        use_bf16 = device.type == "cuda" and not args.no_bf16
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
        mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else None
        step = make_step(loss_of(runner), optimizer, batches, autocast, after_step, mark)
        timing = time_steps(step, device, args.warmup, args.steps)
        row.warmup_s = timing["warmup_s"]
        row.loss = timing["loss"]
        row.samples_per_s = args.batch * args.steps / timing["seconds"]
        row.ms_per_step = statistics.median(timing["per_step_ms"])
        row.ms_spread = f"{min(timing['per_step_ms']):.1f}-{max(timing['per_step_ms']):.1f}"
        row.mfu = mfu(row.samples_per_s, flops, device)
        row.peak_mem_gib = peak_memory_gib(device)
        if not math.isfinite(row.loss):
            row.status, row.note = "FAILED", f"non-finite loss {row.loss} after the timed steps"
        if args.profile and family == "course" and row.status == "ok":
            try:
                trace = Path(args.out) / f"trace_{name}.json.gz" if args.trace and args.out else None
                profiles[name] = profile_step(step, device, args.profile_steps, args.profile_rows, trace)
            except Exception as error:  # noqa: BLE001
                profiles[name] = f"profiler failed: {type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001: one failed configuration is a row, not the end of the table
        traceback.print_exc()
        row.status = "FAILED"
        row.note = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    finally:
        del model, runner, optimizer, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            torch._dynamo.reset()  # the next configuration compiles from scratch, with its own cache
        except Exception:  # noqa: BLE001
            pass
    return row


# --------------------------------------------------------------------------- open_clip_train, WRA


def run_open_clip_train(mode: str, args) -> Row:
    """``python -m open_clip_train.main --dataset-type synthetic ...`` (its own loop), last rate logged."""
    name = f"open_clip_train.main ({mode})"
    if args.size != "gpu-base":
        return Row(name, status="skipped", note="open_clip_train.main is run with ViT-B-16 only: --size gpu-base")
    note = ensure_module("open_clip_train", args.site, args.wheels, install=not args.no_install)
    if not _importable("open_clip_train") or not _importable("webdataset"):
        return Row(name, status="skipped", note=note)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
                   "--model", "ViT-B-16", "--batch-size", str(args.batch),
                   "--precision", "amp_bf16", "--train-num-samples", str(args.batch * steps), "--epochs", "1",
                   "--warmup", "0", "--workers", str(args.workers), "--log-every-n-steps", str(max(1, args.steps // 2)),
                   "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
                   "--logs", logs] + (["--torchcompile"] if mode == "compiled" else [])
        print("running: python3", shlex.join(command[1:]), flush=True)
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.open_clip_train_timeout)
        except subprocess.TimeoutExpired:
            return Row(name, status="FAILED", note=f"timed out after {args.open_clip_train_timeout} s")
    output = proc.stdout + proc.stderr
    rates = re.findall(r"([\d.]+)/s/gpu", output)
    if proc.returncode or not rates:
        print(output[-3000:], flush=True)
        return Row(name, status="FAILED", note=f"exit {proc.returncode}, no samples/s/gpu logged")
    return Row(name, samples_per_s=float(rates[-1]), note="its own loop and data loader; last logged interval")


def run_wra(args, device) -> tuple[dict | None, str]:
    """``benchmarks/bench_wra.py --device <device>`` in a subprocess: (its JSON, a summary)."""
    note = ensure_module("ot", args.site, args.wheels, install=not args.no_install)
    if not _importable("ot"):
        return None, f"skipped: {note}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "wra.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "bench_wra.py"), "--device", str(device),
                   "--json", str(out)]
        if args.size.startswith("cpu"):  # the smoke run: the code path, in seconds, not the figures
            command += ["--batch", "8", "--repeats", "1", "--max-iter", "100"]
        if os.environ.get("COURSE_THREADS"):
            command += ["--threads", os.environ["COURSE_THREADS"]]
        shown = [c for c in command[2:] if c not in ("--json", str(out))]
        print("\nrunning: python3", shlex.join(["benchmarks/bench_wra.py"] + shown), flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(args.site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.wra_timeout)
        print(proc.stdout, proc.stderr[-2000:] if proc.returncode else "", flush=True)
        if proc.returncode or not out.exists():
            return None, f"FAILED: bench_wra exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    rows = {r["name"]: r for r in result["rows"]}
    exact = rows.get("POT ot.emd2 loop (exact)")
    ipot = next((r for n, r in rows.items()
                 if n.startswith("ours IPOT") and "50 it" in n and "cost_scale" not in n), None)
    if not exact or not ipot:
        return result, "bench_wra's rows are missing the emd2 loop or IPOT at 50 iterations"
    speedup = exact["ms"] / ipot["ms"]
    batched = [r for n, r in rows.items() if n.startswith("POT solve_batch") and "proximal" not in n
               and math.isfinite(r["mean_err"]) and r["mean_err"] <= 0.01 and math.isfinite(r["ms"])]
    best = min(batched, key=lambda r: r["ms"]) if batched else None
    met = speedup >= TARGET_WRA_SPEEDUP and ipot["mean_err"] <= 0.01
    summary = (f"IPOT 50 it (UNITER) {ipot['ms']:.1f} ms at {100 * ipot['mean_err']:.2f}% mean error; "
               f"exact emd2 loop {exact['ms']:.1f} ms: {speedup:.1f}x "
               f"(target >= {TARGET_WRA_SPEEDUP:.0f}x at <= 1%: {'MET' if met else 'MISSED'})")
    if best:
        summary += (f"; fastest solve_batch within 1%: {best['name']} {best['ms']:.1f} ms "
                    f"({best['ms'] / ipot['ms']:.1f}x IPOT's time)")
    return result, summary


# --------------------------------------------------------------------------- report


def environment(device) -> dict:
    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu", "driver": None,
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sms"] = props.multi_processor_count
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    for module in ("triton", "open_clip", "ot"):
        try:
            env[module] = importlib.import_module(module).__version__ if _importable(module) else None
        except Exception:  # noqa: BLE001
            env[module] = None
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        f"{value * scale:{spec}}{suffix}"


def table(rows: list[Row], reference: Row | None) -> str:
    head = ("| configuration | status | samples/s | vs open_clip compiled | ms/step (median; min-max) | MFU | "
            "GFLOPs/sample (train) | peak mem (GiB) | params (M) | warm-up (s) | loss | note |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = (f"{r.samples_per_s / reference.samples_per_s:.2f}x"
                 if reference and reference.samples_per_s and r.samples_per_s else "n/a")
        step = "n/a" if r.ms_per_step is None else f"{r.ms_per_step:.1f} ({r.ms_spread})"
        lines.append(f"| {r.name} | {r.status} | {_fmt(r.samples_per_s, ',.0f')} | {ratio} | {step} | "
                     f"{_fmt(r.mfu, '.1f', 100, '%')} | {_fmt(r.gflops_per_sample, '.2f')} | "
                     f"{_fmt(r.peak_mem_gib, '.2f')} | {_fmt(r.params_m, '.2f')} | {_fmt(r.warmup_s, '.1f')} | "
                     f"{_fmt(r.loss, '.4f')} | {r.note.replace('|', '/')} |")
    return "\n".join(lines)


def wra_table(result: dict) -> str:
    """bench_wra's rows as a markdown table."""
    setup = result["setup"]
    lines = [f"WRA solvers, {setup['batch']} problems of {setup['words']} x {setup['regions']}, d = {setup['dim']}, "
             f"device {setup['device']}, POT {setup['pot']}, medians of {setup['repeats']} runs:", "",
             "| solver | ms / batch | mean error | max error | note |", "|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {_fmt(r['ms'], '.1f')} | {_fmt(r['mean_err'], '.2f', 100, '%')} | "
                     f"{_fmt(r['max_err'], '.2f', 100, '%')} | {r['note'].replace('|', '/')} |")
    return "\n".join(lines)


def verdicts(rows: dict[str, Row], on_target: bool = True) -> list[str]:
    """The issue's two throughput targets, MET or MISSED; ``on_target=False`` (not gpu-base on a GPU)
    marks the lines as a smoke run's, which says nothing about the targets."""
    course, reference = rows.get("course-compiled"), rows.get("open_clip-compiled")
    out = [] if on_target else ["(smoke run: the targets are for gpu-base on an H100/H200; the lines below "
                                "only show that the comparison is computed)"]
    if course and course.status == "ok" and reference and reference.status == "ok":
        ratio = course.samples_per_s / reference.samples_per_s
        out.append(f"course compiled / open_clip compiled: {ratio:.2f}x (target >= {TARGET_SPEEDUP}x: "
                   f"{'MET' if ratio >= TARGET_SPEEDUP else 'MISSED'})")
    else:
        out.append("course compiled / open_clip compiled: not measured (a row above is not ok)")
    if course and course.status == "ok" and course.mfu is not None:
        out.append(f"course compiled MFU: {100 * course.mfu:.1f}% (target >= {100 * TARGET_MFU:.0f}%: "
                   f"{'MET' if course.mfu >= TARGET_MFU else 'MISSED'})")
    else:
        out.append("course compiled MFU: n/a (no GPU peak for this device, or the row failed)")
    return out


def reproduce_command(argv: list[str]) -> str:
    return "python3 benchmarks/gpu_throughput.py" + ("" if not argv else " " + shlex.join(argv))


# --------------------------------------------------------------------------- main


def parse_args(argv):
    cuda = _cuda_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="gpu-base" if cuda else "cpu-tiny", help="a course_lib.presets preset")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 at gpu sizes, 8 at cpu sizes")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="excluded steps (default: 5 on a GPU, 1 on a CPU)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, in order, from {CONFIGS + EXTRA_CONFIGS}")
    p.add_argument("--vocab", type=int, default=None, help=f"text vocabulary (default: {OPEN_CLIP_VOCAB} at "
                   "gpu sizes, as open_clip's ViT-B-16; the preset's 256 at cpu sizes)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="float32 on the GPU too")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: the CPU test)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the course steps, top entries")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--trace", action="store_true", help="with --profile and --out: write each profile's "
                   "Chrome trace there (trace_<configuration>.json.gz)")
    p.add_argument("--no-wra", action="store_true", help="skip benchmarks/bench_wra.py")
    p.add_argument("--open-clip-train", choices=("off", "eager", "compiled"), default="off",
                   help="also run open_clip_train.main on synthetic data (a cross-check; compiling costs a minute)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers of --open-clip-train")
    p.add_argument("--open-clip-train-timeout", type=int, default=240)
    p.add_argument("--wra-timeout", type=int, default=240)
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip what would start after this many seconds (default: 420 on a GPU, none on a CPU)")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="where missing wheels are installed")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="the folder of wheels (default: benchmarks/wheels)")
    p.add_argument("--no-install", action="store_true", help="never install wheels; rows that need them are skipped")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for gpu_throughput.md/.json (default: $OUT when set)")
    args = p.parse_args(argv)
    gpu = not args.size.startswith("cpu")
    args.batch = args.batch or (256 if gpu else 8)
    args.steps = args.steps or (30 if args.device.startswith("cuda") else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.device.startswith("cuda") else 1)
    args.vocab = args.vocab or (OPEN_CLIP_VOCAB if gpu else None)
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device.startswith("cuda") else 0.0
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.config_list if c not in CONFIGS + EXTRA_CONFIGS]
    if unknown:
        p.error(f"unknown configurations {unknown}; valid: {CONFIGS + EXTRA_CONFIGS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but torch {torch.__version__} sees no CUDA device")
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        p.error("--steps must be >= 1, --warmup >= 0 and --batch >= 2 (a contrastive batch needs negatives)")
    return args


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    began = time.perf_counter()
    args = parse_args(argv)
    if args.vocab is None:
        from course_lib.models.clip import CLIPConfig
        args.vocab = CLIPConfig.from_preset(args.size).vocab_size
    threads = int(os.environ.get("COURSE_THREADS", 0))
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # as open_clip_train and course_lib.pretrain set them, for every row
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = course_config(args.size, args.vocab)
    print(f"gpu_throughput: {args.size} (image {cfg.image_size} px, patch {cfg.patch_size}, vision "
          f"{cfg.vision_layers}x{cfg.vision_width}, text {cfg.text_layers}x{cfg.text_width}, context "
          f"{cfg.context_length}, vocab {cfg.vocab_size}), batch {args.batch}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, bf16={device.type == 'cuda' and not args.no_bf16}, "
          f"compile backend {args.compile_backend}, on {device}", flush=True)
    if device.type == "cuda":
        print(f"on {torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"Python {platform.python_version()}", flush=True)
    batches = synthetic_batches(2, args.batch, cfg.image_size, cfg.context_length, cfg.vocab_size, device, args.seed)

    rows: list[Row] = []
    profiles: dict[str, str] = {}
    for name in args.config_list:
        elapsed = time.perf_counter() - began
        if args.budget_s and elapsed > args.budget_s:
            row = Row(name, status="skipped", note=f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}")
        else:
            print(f"\n== {name}", flush=True)
            row = run_config(name, args, device, batches, profiles)
        rows.append(row)
        print(f"-> {name}: {row.status}, {_fmt(row.samples_per_s, ',.0f')} samples/s, MFU "
              f"{_fmt(row.mfu, '.1f', 100, '%')}, peak {_fmt(row.peak_mem_gib, '.2f')} GiB, warm-up "
              f"{_fmt(row.warmup_s, '.1f')} s {row.note}", flush=True)
        if name in profiles:
            print(f"\nprofile of {name} ({args.profile_steps} steps):\n{profiles[name]}", flush=True)
    if args.open_clip_train != "off":
        elapsed = time.perf_counter() - began
        if args.budget_s and elapsed > args.budget_s:
            rows.append(Row(f"open_clip_train.main ({args.open_clip_train})", status="skipped",
                            note=f"time budget: {elapsed:.0f} s"))
        else:
            try:
                rows.append(run_open_clip_train(args.open_clip_train, args))
            except Exception as error:  # noqa: BLE001
                rows.append(Row(f"open_clip_train.main ({args.open_clip_train})", status="FAILED",
                                note=f"{type(error).__name__}: {error}"[:300]))
    del batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    wra, wra_summary = None, "skipped: --no-wra"
    if not args.no_wra:
        elapsed = time.perf_counter() - began
        if args.budget_s and elapsed > args.budget_s + 60:
            wra_summary = f"skipped: time budget ({elapsed:.0f} s)"
        else:
            try:
                wra, wra_summary = run_wra(args, device)
            except Exception as error:  # noqa: BLE001
                wra_summary = f"FAILED: {type(error).__name__}: {error}"[:300]

    by_name = {r.name: r for r in rows}
    reference = by_name.get("open_clip-compiled")
    reference = reference if reference and reference.status == "ok" else None
    env = environment(device)
    report = [f"## GPU throughput run, {env['date_utc']} UTC",
              "",
              "machine: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k != "date_utc"),
              f"setting: {args.size}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, "
              f"bf16={device.type == 'cuda' and not args.no_bf16}, synthetic data on the device, "
              f"compile backend {args.compile_backend}",
              "",
              table(rows, reference),
              "",
              *verdicts(by_name, on_target=device.type == "cuda" and args.size == "gpu-base"),
              f"WRA ({'bench_wra.py --device ' + str(device)}): {wra_summary}",
              "",
              *([wra_table(wra), ""] if wra else []),
              f"total wall time {time.perf_counter() - began:.0f} s",
              "reproduce: " + reproduce_command(argv)]
    text = "\n".join(report)
    print("\n" + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        profile_text = "".join(f"\n\n### profile: {k}\n\n```\n{v}\n```" for k, v in profiles.items())
        (out / "gpu_throughput.md").write_text(text + profile_text + "\n")
        (out / "gpu_throughput.json").write_text(json.dumps(
            {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows],
             "wra": wra, "wra_summary": wra_summary, "profiles": profiles}, indent=1, default=str))
        print(f"written: {out / 'gpu_throughput.md'}, {out / 'gpu_throughput.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
