"""``python -m course_lib.pretrain``: the course's models at GPU scale, on one process or many.

    python -m course_lib.pretrain --model=clip --preset=cpu-tiny --steps=100
    torchrun --standalone --nproc_per_node 8 -m course_lib.pretrain --preset=gpu-base \\
        --global_batch=2048 --micro_batch=256 --compile=True --num_workers=12 --steps=20000

Every option is a field of :class:`PretrainConfig`; ``--key=value`` overrides it (the value's
type must match, an unknown key is an error listing the valid ones); ``--model.<field>=value``
overrides a field of the model's config (e.g. ``--model.vision_layers=6``).

Data (``--data``): an image model (CLIP) reads ``shapeworld`` (image-caption pairs rendered on
the fly), ``shards`` (image-text webdataset shards at ``--data_path``) or ``synthetic`` (random
tensors, for throughput); a region model (a class with ``inputs = "regions"``: VisualBERT, ...)
reads ``shapeworld`` (detected regions on the fly, ``course_lib.data.regions``) or
``region_shards`` (bottom-up-attention features written by ``data_scripts.shard_regions``;
``course_lib.data.region_shards``). The tokenizer is learned from the shards' captions, or from
ShapeWorld's.

What it does, in nanoGPT's spirit: bf16 autocast on GPUs, fused attention (the model's
``scaled_dot_product_attention`` path), optional ``torch.compile`` and activation
checkpointing, fused AdamW with warmup + cosine decay, DDP under ``torchrun`` (the contrastive
loss gathers features across processes with gradient), and gradient accumulation that keeps
the global batch, and the loss, the same on any number of processes: a contrastive loss is not
a sum over samples, so accumulation first embeds every micro-batch without gradient, then
re-embeds one micro-batch at a time with gradient and scores it against the cached rest
(open_clip's ``--accum-freq``; Gao et al. 2021, GradCache). Checkpoints are atomic and resume
exactly; a run never replaces the checkpoint it finds in ``out_dir`` unless told to
(``--resume=True`` continues it, ``--overwrite=True`` replaces it), and says in its first line
whether it starts fresh or resumes from step N. Errors in the options, the data or the
checkpoint print one ``error: ...`` line and exit with status 2. Progress lines print
samples/s, peak memory and MFU (``course_lib.flops``).
"""

from __future__ import annotations

import ast
import math
import sys
import tarfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from course_lib.checkpoint import (get_rng_states, load_checkpoint, remove_stale_temp_files, save_checkpoint,
                                  set_rng_states)
from course_lib.data.onthefly import (MicroBatchStream, ShapeWorldPairs, ShardBatches, SyntheticPairs, bound_text,
                                     shard_micro_batches)
from course_lib.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_flag, cleanup,
                                    init_distributed, wrap_ddp)
from course_lib.flops import Throughput, device_name, model_flops_per_sample
from course_lib.models.registry import build_config, model_entry
from course_lib.presets import apply_overrides, get_preset
from course_lib.train import (History, TrainConfig, check_resumable, make_optimizer, move_to_device, start_line,
                              start_mode, warmup_cosine_schedule)
from course_lib.utils import check_one_of, count_parameters, seed_everything

DATA_SOURCES = ("shapeworld", "shards", "synthetic", "region_shards")
DATA_FOR_INPUTS = {"images": ("shapeworld", "shards", "synthetic"), "regions": ("shapeworld", "region_shards")}
SHARD_SOURCES = ("shards", "region_shards")  # the sources read from data_path
TOKENIZER_SAMPLES = 5000  # shard samples whose captions the tokenizer learns from
TOKENIZER_WORDS = 256  # the tokenizer learns from the first 256 words of each caption (bounded memory)
# A resumed run must agree with the checkpoint on these, or its losses would not continue the run's.
SAME_RUN_FIELDS = ("model", "preset", "data", "data_path", "global_batch", "seed", "model_overrides")


@dataclass
class PretrainConfig:
    """One pretraining run. ``micro_batch=0`` means global_batch / processes (no accumulation);
    ``max_seconds=0`` means no time limit (checked at log steps, then a checkpoint is saved);
    ``tokenizer``: a directory holding a saved tokenizer, built there if missing (default
    ``out_dir/tokenizer``); ``bf16``: autocast to bfloat16 on CUDA (CPUs compute in float32);
    ``warmup``: linear warmup steps (at most ``steps``), then cosine decay to 0.

    ``out_dir/checkpoint.pt`` is never replaced by surprise: a run that finds one there refuses to
    start unless ``resume=True`` (continue it; a checkpoint beyond ``steps`` is an error) or
    ``overwrite=True`` (replace it). Every run prints one line saying which it does."""

    model: str = "clip"
    preset: str = "cpu-tiny"
    data: str = "shapeworld"
    data_path: str = ""
    tokenizer: str = ""
    global_batch: int = 64
    micro_batch: int = 0
    steps: int = 100
    lr: float = 5e-4
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 2
    device: str = ""
    out_dir: str = "runs/pretrain"
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    seed: int = 0
    max_seconds: float = 0.0
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        check_one_of("data", self.data, DATA_SOURCES)
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict of model config fields, got {self.model_overrides!r}")
        get_preset(self.preset)
        build_config(self.model, self.preset, **self.model_overrides)  # unknown model / field -> error
        for name, low in (("global_batch", 1), ("micro_batch", 0), ("steps", 1), ("warmup", 0), ("num_workers", 0),
                          ("checkpoint_every", 0), ("log_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "max_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0: the weights would never change")
        for name in ("resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other: resume continues the "
                             "checkpoint in out_dir, overwrite replaces it; pass one of them")
        if self.global_batch < 2 and hasattr(model_entry(self.model).model, "loss_from_embeddings"):
            raise ValueError(f"global_batch must be >= 2 for the contrastive model {self.model!r}, got "
                             f"{self.global_batch}: with one pair per batch there are no negatives, the loss "
                             "is exactly 0 and nothing is learned")
        check_data_for_model(self.model, self.data)
        if self.data in SHARD_SOURCES and not self.data_path:
            raise ValueError(f"data={self.data!r} needs data_path (a directory, glob or brace pattern of .tar shards)")


def model_inputs(name: str) -> str:
    """What model ``name`` reads: its class attribute ``inputs`` (``"images"`` when it has none)."""
    return getattr(model_entry(name).model, "inputs", "images")


def check_data_for_model(model: str, data: str) -> None:
    """``ValueError`` naming ``--data`` and the sources that fit unless model ``model`` can read ``data``."""
    inputs = model_inputs(model)
    if inputs not in DATA_FOR_INPUTS:
        raise ValueError(f"model {model!r} reads inputs={inputs!r}; pretrain feeds {sorted(DATA_FOR_INPUTS)}")
    fits = DATA_FOR_INPUTS[inputs]
    if data not in fits:
        gives = "region features" if data == "region_shards" else "images"
        raise ValueError(f"--data={data} gives {gives}, but model {model!r} reads {inputs}; use "
                         + " or ".join(f"--data={d}" for d in fits) + f" (or a model that reads {gives})")


def parse_args(argv: list[str]) -> PretrainConfig:
    """``["--steps=10", "--model.vision_layers=1"]`` -> a checked :class:`PretrainConfig`."""
    defaults, kinds = PretrainConfig(), {f.name: f for f in fields(PretrainConfig)}
    overrides, model_overrides = {}, {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments must look like --key=value, got {arg!r}; valid keys are {sorted(kinds)}")
        key, raw = arg[2:].split("=", 1)
        is_str = key in kinds and isinstance(getattr(defaults, key), str)
        value = raw if is_str else _literal(raw)
        if key.startswith("model."):
            model_overrides[key[len("model."):]] = value
        else:
            overrides[key] = value
    if model_overrides:
        overrides["model_overrides"] = model_overrides
    return apply_overrides(defaults, overrides)


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word is a string


@dataclass
class PretrainResult:
    model: torch.nn.Module  # the plain model (no DDP / compile wrapper), on its device
    history: History
    flops_per_sample: float  # training FLOPs (3 x forward) per sample
    samples_per_s: float | None  # steady state: after the first log interval (compilation, warm-up)


def _tokenizer(config: PretrainConfig, vocab_size: int, info: DistInfo):
    """Load the tokenizer from its directory; rank 0 trains it there first if it is missing."""
    from course_lib.data.shapeworld import ShapeWorld
    from course_lib.features.text import load_tokenizer, save_tokenizer, train_tokenizer

    directory = Path(config.tokenizer or Path(config.out_dir) / "tokenizer")
    if info.is_main and not (directory / "tokenizer.json").exists():
        if config.data in SHARD_SOURCES:  # learn the vocabulary of the shards' captions
            texts = [bound_text(t, TOKENIZER_WORDS) for t in _shard_texts(config) if t.strip()]
            if not texts:
                raise ValueError(f"data_path={config.data_path!r}: the first {TOKENIZER_SAMPLES} readable samples of "
                                 "the shards hold no caption (no non-empty txt field) to learn a tokenizer from")
        else:  # the world's vocabulary is small: 500 scenes cover it
            texts = ShapeWorld(seed=config.seed).corpus(500)
        save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), directory)
    barrier()
    tokenizer = load_tokenizer(directory)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {directory} has {len(tokenizer)} tokens; the model's vocab_size is {vocab_size}")
    return tokenizer


def _shard_texts(config: PretrainConfig):
    """The captions of the first ``TOKENIZER_SAMPLES`` readable samples of ``config.data_path``."""
    if config.data == "region_shards":  # every caption (and question) of each image's json
        from course_lib.data.region_shards import region_shard_texts
        return region_shard_texts(config.data_path, max_samples=TOKENIZER_SAMPLES)
    from course_lib.data.shards import ShardDataset
    reader = ShardDataset(config.data_path, decode="rgb", split_by_node=False, split_by_worker=False)
    return (s["text"] for s, _ in zip(reader, range(TOKENIZER_SAMPLES)))


def _micro_batches(config, mc, info: DistInfo, micro: int, accum: int, start_step: int):
    """Endless iterator of this process's micro-batches, from optimizer step ``start_step`` on."""
    workers = dict(num_workers=config.num_workers, pin_memory=info.device.type == "cuda",
                   persistent_workers=config.num_workers > 0, prefetch_factor=4 if config.num_workers else None)
    if model_inputs(config.model) == "regions":
        return _checked_regions(_region_micro_batches(config, mc, info, micro, accum, start_step, workers), config, mc)
    if config.data == "synthetic":
        make = SyntheticPairs(mc.image_size, mc.context_length, mc.vocab_size, config.seed)
    if config.data == "shapeworld":
        from course_lib.data.shapeworld import ShapeWorld
        make = ShapeWorldPairs(ShapeWorld(image_size=mc.image_size, seed=config.seed),
                               _tokenizer(config, mc.vocab_size, info), mc.context_length)
    if config.data != "shards":
        stream = MicroBatchStream(make, micro, accum, info.rank, info.world_size, start_step)
        return iter(DataLoader(stream, batch_size=None, **workers))
    from course_lib.data.shards import ShardDataset
    shards = ShardDataset(config.data_path, image_size=mc.image_size, shuffle=1000, seed=config.seed)
    collate = ShardBatches(_tokenizer(config, mc.vocab_size, info), mc.context_length)
    return shard_micro_batches(shards, micro, collate, skip=start_step * accum, **workers)


def _region_micro_batches(config, mc, info: DistInfo, micro: int, accum: int, start_step: int, workers: dict):
    """Region batches (``input_ids``, ``region_feats`` (B, R, F), ...) of ShapeWorld's detected regions,
    or of bottom-up-attention region shards padded to ``max_regions`` (the model config's, else 36)."""
    tokenizer = _tokenizer(config, mc.vocab_size, info)
    tags = getattr(mc, "use_tags", False)  # Oscar reads the detector's class names as object tags
    if config.data == "shapeworld":
        from course_lib.data.regions import ShapeWorldRegions
        from course_lib.data.shapeworld import ShapeWorld
        make = ShapeWorldRegions(ShapeWorld(seed=config.seed), tokenizer, mc.context_length,
                                 **({"max_regions": mc.max_regions} if hasattr(mc, "max_regions") else {}),
                                 **({"tag_tokens": mc.max_tag_tokens} if tags else {}))
        if getattr(model_entry(config.model).model, "needs_scene_graphs", False):  # ERNIE-ViL masks graph words
            from course_lib.data.scene_graph import ShapeWorldSceneGraphs
            make = ShapeWorldSceneGraphs(make)
        stream = MicroBatchStream(make, micro, accum, info.rank, info.world_size, start_step)
        return iter(DataLoader(stream, batch_size=None, **workers))
    from course_lib.data.region_shards import DEFAULT_MAX_REGIONS, RegionBatches, RegionShardDataset
    max_regions = getattr(mc, "max_regions", DEFAULT_MAX_REGIONS)
    shards = RegionShardDataset(config.data_path, max_regions=max_regions, shuffle=1000, seed=config.seed)
    collate = RegionBatches(tokenizer, mc.context_length, max_regions, **(_tag_names(mc) if tags else {}))
    return shard_micro_batches(shards, micro, collate, skip=start_step * accum, **workers)


def _tag_names(mc) -> dict:
    """The class names that turn region shards' labels into object tags (``--model.tag_names_file``)."""
    from course_lib.features.tags import read_class_names

    if not mc.tag_names_file:
        raise ValueError("--data=region_shards gives class ids, and the model reads object tags: pass "
                         "--model.tag_names_file=PATH, a file naming the detector's classes one per line (line i "
                         "names class i, e.g. bottom-up-attention's objects_vocab.txt), or --model.use_tags=False")
    return {"tag_names": read_class_names(mc.tag_names_file), "tag_tokens": mc.max_tag_tokens}


def _checked_regions(batches, config: PretrainConfig, mc):
    """``batches``, each checked against the model config: the feature width must be its
    ``region_feat_dim`` and the labels below its ``num_region_classes - 1`` (the last class is
    "no object"); a mismatch is a ``ValueError`` naming the ``--model.`` option to set."""
    for batch in batches:
        width = batch["region_feats"].shape[-1]
        if hasattr(mc, "region_feat_dim") and width != mc.region_feat_dim:
            raise ValueError(f"--data={config.data} gives region features of width {width}, but the model config "
                             f"has region_feat_dim={mc.region_feat_dim}; pass --model.region_feat_dim={width}")
        labels = batch.get("region_labels")
        top = int(labels.max()) if labels is not None and labels.numel() else -1
        if hasattr(mc, "num_region_classes") and top >= mc.num_region_classes - 1:
            raise ValueError(f"--data={config.data} gives region labels up to {top}, but the model config has "
                             f"num_region_classes={mc.num_region_classes} (classes + 'no object'); pass "
                             f"--model.num_region_classes={top + 2} or more")
        yield batch


def _to_device(batch: dict, device: torch.device) -> dict:
    """Move to ``device``; uint8 images (when the batch has images) become float in [0, 1] there
    (4x less to copy)."""
    batch = move_to_device(batch, device)
    if "images" in batch and batch["images"].dtype == torch.uint8:
        batch["images"] = batch["images"].float().div_(255.0)
    return batch


def _accumulate(runner, raw, batches, autocast):
    """Plain accumulation: backpropagate each micro-batch's loss / k (losses that are means over samples).

    A model may log different scalars on different micro-batches (UNITER runs one task per batch): each
    is summed over the micro-batches that logged it, divided by k, as ``course_lib.train`` does."""
    accum, total = len(batches), {}
    for m, batch in enumerate(batches):
        with runner.no_sync() if m < accum - 1 and hasattr(runner, "no_sync") else nullcontext(), autocast():
            out = runner(batch)
            (out["loss"] / accum).backward()
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                total[k] = total[k] + v.detach().float() / accum if k in total else v.detach().float() / accum
    return total


def _accumulate_contrastive(runner, raw, batches, autocast):
    """Exact global-batch contrastive gradient over k micro-batches (GradCache / open_clip accum_freq)."""
    accum = len(batches)
    with torch.no_grad(), autocast():
        cached = [runner(batch, embeddings_only=True) for batch in batches]  # k x {name: (b, E)}
    for m, batch in enumerate(batches):
        with runner.no_sync() if m < accum - 1 and hasattr(runner, "no_sync") else nullcontext(), autocast():
            fresh = runner(batch, embeddings_only=True)
            embeddings = {k: torch.cat([c[k] for c in cached[:m]] + [fresh[k]] + [c[k] for c in cached[m + 1:]])
                          for k in fresh}  # (k * b, E), only micro-batch m carries gradient
            out = raw.loss_from_embeddings(**embeddings, learn_temperature=m == accum - 1)
            out["loss"].backward()
    return {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}


def _flush(pending: list, history: History) -> None:
    """Fetch the pending steps' scalars in one device sync, averaged over processes, into ``history``."""
    if not pending:
        return
    names = [sorted(scalars) for _, _, scalars in pending]
    flat = torch.stack([scalars[k] for (_, _, scalars), keys in zip(pending, names) for k in keys])
    values = iter(all_reduce_mean(flat).tolist())
    for (step, lr, _), keys in zip(pending, names):
        record = {"step": step, "lr": lr, **{k: next(values) for k in keys}}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}; lower lr or check the data")
        history.append(record)
    pending.clear()


def _log(step: int, config: PretrainConfig, history: History, t: dict, device: torch.device) -> None:
    memory = "peak mem" if device.type == "cuda" else "peak RSS"
    util = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
    print(f"step {step}/{config.steps} | loss {history.last():.4f} | lr {history.last('lr'):.2e} | "
          f"{t['samples_per_s']:,.0f} samples/s | {t['ms_per_step']:.1f} ms/step | "
          f"{memory} {t['memory_gib']:.2f} GiB | MFU {util}", flush=True)


def pretrain(config: PretrainConfig, callback=None) -> PretrainResult:
    """Run ``config`` (in a torchrun process group if launched by torchrun); ``callback(step, history)``
    is called after every step, after that step's checkpoint."""
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(config.device or None)
    try:
        return _pretrain(config, info, callback)
    finally:
        if owns_group:
            cleanup()


def _batch_plan(config: PretrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) with micro_batch x accumulation x world_size = global_batch."""
    micro = config.micro_batch or config.global_batch // world_size
    accum = config.global_batch // max(1, micro * world_size)
    if micro < 1 or accum * micro * world_size != config.global_batch:
        raise ValueError(f"global_batch={config.global_batch} must be micro_batch={micro} x world_size="
                         f"{world_size} x an integer number of accumulation steps")
    return micro, accum


def _check_data_path(config: PretrainConfig) -> None:
    """Name what is wrong with ``data_path`` before anything is built: missing, empty, a plain file."""
    spec = config.data_path
    if config.data not in SHARD_SOURCES or "://" in spec or spec.startswith("pipe:"):
        return
    from course_lib.data.shards import list_shards

    path = Path(spec)
    if not any(c in spec for c in "*?[{"):
        if not path.exists():
            raise FileNotFoundError(f"data_path={spec!r} does not exist; expected a directory of .tar shards, "
                                    "a glob or a brace pattern of them")
        if path.is_file() and not tarfile.is_tarfile(path):
            raise ValueError(f"data_path={spec!r} is a plain file, not a .tar shard (nor a tar that opens); give the "
                             "directory that holds the shards (or a glob or brace pattern of them)")
    try:
        list_shards(spec)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data_path={spec!r}: {str(error).removeprefix('urls_or_dir: ')}") from None


def _resume(path: Path, config: PretrainConfig, model, optimizer, scheduler) -> tuple[int, History]:
    state = load_checkpoint(path, model, optimizer, scheduler)  # RNG states included
    saved = state["extra"]["config"]
    for name in SAME_RUN_FIELDS:
        if saved.get(name) != getattr(config, name):
            raise ValueError(f"resume: {name}={getattr(config, name)!r} differs from {saved.get(name)!r} "
                             f"in the checkpoint {path}; use another out_dir, or overwrite=True to replace it")
    check_resumable(path, state["step"], config.steps)
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # this config's schedule (steps may differ)
    return state["step"], History.from_dict(state["history"])


def _pretrain(config: PretrainConfig, info: DistInfo, callback) -> PretrainResult:
    device = info.device
    micro, accum = _batch_plan(config, info.world_size)
    path = Path(config.out_dir) / "checkpoint.pt"
    mode = start_mode(path, config.resume, config.overwrite, where="out_dir")  # refuses to overwrite by surprise
    _check_data_path(config)
    seed_everything(config.seed)
    if device.type == "cuda":  # float32 matmuls outside autocast may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    mc = build_config(config.model, config.preset, **config.model_overrides)
    model = model_entry(config.model).model(mc)
    if config.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"grad_checkpointing=True but model {config.model!r} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model.to(device)
    optimizer = make_optimizer(model, TrainConfig(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay))
    scheduler = warmup_cosine_schedule(optimizer, min(config.warmup, config.steps), config.steps)
    start, history, rng = 0, History(), None
    if mode == "resume":
        start, history = _resume(path, config, model, optimizer, scheduler)
        rng = get_rng_states()  # the checkpoint's: set again once the data loader has drawn its seed
    if info.is_main:
        print(start_line(mode, path, start, config.steps, config.resume), flush=True)
        if mode == "overwrite" or config.resume:  # this run owns out_dir
            remove_stale_temp_files(path)  # left by a save that was killed
    batches = _micro_batches(config, mc, info, micro, accum, start)
    example = next(batches)
    batches = chain([example], batches)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # counting runs a forward: it must not draw from the run's RNG
        flops = model_flops_per_sample(model, _to_device({k: v[:2] for k, v in example.items()}, device))
    runner = wrap_ddp(torch.compile(model) if config.compile else model, info)
    step_fn = _accumulate_contrastive if accum > 1 and hasattr(model, "loss_from_embeddings") else _accumulate
    use_bf16 = config.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if info.is_main:
        print(f"{config.model} @ {config.preset}: {count_parameters(model) / 1e6:.2f}M parameters, "
              f"{flops / 1e9:.3f} GFLOPs/sample/step | {config.data} | global batch {config.global_batch} = "
              f"{micro} x {accum} accumulation x {info.world_size} processes | {device_name(device)}, "
              f"bf16={use_bf16}, compile={config.compile}, grad_checkpointing={config.grad_checkpointing}")
    if rng is not None:  # models that draw (masking, ITM negatives) continue the interrupted run's stream
        set_rng_states(rng)
    pending, meter = [], Throughput(config.global_batch, flops, device, info.world_size, start)
    for step in range(start + 1, config.steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)  # at the start: the last step's gradients stay inspectable
        scalars = step_fn(runner, model, [_to_device(next(batches), device) for _ in range(accum)], autocast)
        if config.grad_clip:
            scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).float()
        pending.append((step, optimizer.param_groups[0]["lr"], scalars))
        optimizer.step()
        scheduler.step()
        stop, last = False, step == config.steps
        if step % config.log_every == 0 or last:
            _flush(pending, history)
            timing = meter.tick(step)
            if info.is_main:
                _log(step, config, history, timing, device)
            stop = broadcast_flag(bool(config.max_seconds) and timing["elapsed_s"] > config.max_seconds, device)
        save = stop or last or (config.checkpoint_every and step % config.checkpoint_every == 0)
        if save or callback is not None:
            _flush(pending, history)
        if save:
            if info.is_main:
                save_checkpoint(path, model, optimizer, scheduler, step=step, history=history,
                                extra={"config": asdict(config), "world_size": info.world_size})
            barrier()
        if callback is not None:
            callback(step, history)
        if stop:
            if info.is_main:
                print(f"max_seconds={config.max_seconds} reached: stopped at step {step}; continue with --resume=True")
            break
    if meter.steady_samples_per_s is not None and info.is_main:
        print(f"steady state: {meter.steady_samples_per_s:,.0f} samples/s")
    return PretrainResult(model, history, flops, meter.steady_samples_per_s)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[1] + "\n\noptions (--key=value):")
        for f in fields(PretrainConfig):
            print(f"  --{f.name}={getattr(PretrainConfig(), f.name)!r}")
        print("  --model.<field>=value   a field of the model's config, e.g. --model.vision_layers=6")
        return
    try:
        pretrain(parse_args(argv))
    except (ValueError, FileNotFoundError) as error:  # bad options, data or checkpoint: a message, no traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
