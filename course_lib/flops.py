"""Model FLOPs and MFU (model FLOPs utilisation), with a per-device peak table.

MFU = achieved model FLOP/s / the device's peak FLOP/s (PaLM, Chowdhery et al. 2022, app. B).
Model FLOPs are counted, not guessed: ``torch.utils.flop_counter.FlopCounterMode`` records
every matrix product and convolution of one forward pass (2 FLOPs per multiply-add, the
convention of open_clip's ``model_profile.csv``); a training step costs about 3 forward passes
(the backward pass computes two products per forward product: gradients of the input and of
the weight). Activation checkpointing adds a recomputed forward that MFU does not count.

nanoGPT hard-coded the A100's 312 TFLOP/s, so its "MFU" read 104% on an H100 (PR #464); here
the peak comes from :data:`PEAK_FLOPS` by device name, and the timing it divides must be taken
after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import math
import re
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets.
# Keys are matched as whole words in ``torch.cuda.get_device_name()``, longest key first.
PEAK_FLOPS: dict[str, float | None] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,      # SXM, reported as "NVIDIA H100 80GB HBM3"
    "H800": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,      # 40 GB and 80 GB, SXM and PCIe
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,  # with fp32 accumulation
    "RTX 3090": 71e12,
    "V100": 125e12,      # fp16 (V100 has no bf16)
    "T4": 65e12,         # fp16
    "MI300X": 1307e12,
    "cpu": None,         # no meaningful peak: MFU is not reported on CPUs
}



def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V of attention: 2 * B * H * Nq * Nk * (d_qk + d_v) (masking not discounted)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode (torch 2.13) has no formula for the CPU flash-attention kernel; it is the same math.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def device_name(device: str | torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, ``"cpu"`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device: str | torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (a ``torch.device``, ``"cuda:0"`` or a device name
    such as ``"NVIDIA A100-SXM4-80GB"``); ``None`` when the device is a CPU or not in the table."""
    if isinstance(device, torch.device) or str(device).split(":")[0] in ("cpu", "cuda", "mps", "xpu"):
        name = device_name(device)
    elif isinstance(device, str) and device.strip():
        name = device
    else:
        raise ValueError(f"device must be a torch.device or a device name, got {device!r}")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", name, flags=re.IGNORECASE):
            return PEAK_FLOPS[key]
    return None


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else []
    for value in values:
        if isinstance(value, (torch.Tensor, dict, list, tuple)):
            return _batch_size(value)
    raise ValueError("inputs hold no tensor to read the batch size from; pass batch_size")


def count_forward_flops(model: torch.nn.Module, inputs) -> int:
    """FLOPs of one forward pass ``model(inputs)`` (a dict or tensor is passed as one argument,
    a tuple as several), counted under ``no_grad`` in eval mode."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    try:
        model.eval()
        # In eval mode without gradients, torch.nn.MultiheadAttention (open_clip's attention) and
        # TransformerEncoderLayer run one fused op whose inner products the counter cannot see (it
        # counted open_clip's CLIP 29% short); their plain path is the same math and is counted.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counter.get_total_flops()


def model_flops_per_sample(model: torch.nn.Module, inputs, training: bool = True,
                           batch_size: int | None = None) -> float:
    """FLOPs per sample of one forward (``training=False``) or one training step (3 x forward).

    inputs: one batch for ``model`` (e.g. a dict of ``(B, ...)`` tensors); ``batch_size``
    defaults to the first dimension of the first tensor found in it.
    """
    size = _batch_size(inputs) if batch_size is None else batch_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive int, got {size!r}")
    flops = count_forward_flops(model, inputs) / size
    return 3.0 * flops if training else flops


def mfu(samples_per_s: float, flops_per_sample: float, device: str | torch.device,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: ``samples_per_s * flops_per_sample / (num_devices * peak)``.

    samples_per_s: over all ``num_devices`` devices together; ``None`` when the peak is unknown.
    """
    for name, value in (("samples_per_s", samples_per_s), ("flops_per_sample", flops_per_sample)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    peak = peak_flops(device)
    if peak is None:
        return None
    return samples_per_s * flops_per_sample / (num_devices * peak)


def peak_memory_gib(device: str | torch.device) -> float:
    """Peak memory so far in GiB: CUDA tensors allocated on a GPU, the process's peak RSS on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Samples/s, ms/step and MFU over the steps between two ``tick`` calls.

    CUDA runs asynchronously: ``tick`` synchronises the device before reading the clock, so a
    measurement covers finished work only (nanoGPT PR #527 saw MFU > 100% without it). The
    first interval (compilation, warm-up) is left out of ``steady_samples_per_s``.
    """

    def __init__(self, samples_per_step: int, flops_per_sample: float, device: str | torch.device,
                 num_devices: int = 1, start_step: int = 0):
        if not isinstance(samples_per_step, int) or samples_per_step < 1:
            raise ValueError(f"samples_per_step must be a positive int, got {samples_per_step!r}")
        self.samples_per_step, self.flops, self.num_devices = samples_per_step, flops_per_sample, num_devices
        self.device = torch.device(device)
        self.began = self.last_time = time.perf_counter()
        self.start = self.last_step = start_step
        self.intervals: list[tuple[int, float]] = []  # (steps, seconds) after the first interval

    def tick(self, step: int) -> dict:
        """``{"samples_per_s", "ms_per_step", "mfu" (None on CPUs), "memory_gib", "elapsed_s"}`` since the last tick."""
        if not isinstance(step, int) or step <= self.last_step:
            raise ValueError(f"step must be an int > the last tick's step {self.last_step}, got {step!r}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        steps, seconds = step - self.last_step, now - self.last_time
        if self.last_step > self.start:
            self.intervals.append((steps, seconds))
        self.last_time, self.last_step = now, step
        rate = self.samples_per_step * steps / seconds
        return {"samples_per_s": rate, "ms_per_step": 1e3 * seconds / steps,
                "mfu": mfu(rate, self.flops, self.device, self.num_devices),
                "memory_gib": peak_memory_gib(self.device), "elapsed_s": now - self.began}

    @property
    def steady_samples_per_s(self) -> float | None:
        if not self.intervals:
            return None
        return self.samples_per_step * sum(n for n, _ in self.intervals) / sum(t for _, t in self.intervals)
