"""benchmarks/gpu_throughput.py (issue 16) on the CPU, so that the one GPU run cannot fail on a typo.

The script runs end to end at cpu-tiny with a couple of steps (``torch.compile`` with the
``aot_eager`` backend: dynamo and AOTAutograd trace the same step as on the GPU, without Inductor's
C++ build). open_clip's rows run when ``open_clip`` imports (or installs from the git-ignored
``benchmarks/wheels/`` and then imports); CI has neither open_clip nor the wheels, and there the
rows must say "skipped" with the reason, never fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_throughput.py"
CONFIGS = ["course-eager", "course-compiled", "open_clip-eager", "open_clip-compiled"]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_script_runs_end_to_end_at_cpu_tiny(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--size", "cpu-tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
               "--batch", "4", "--compile-backend", "aot_eager", "--profile", "--profile-steps", "1",
               "--profile-rows", "5", "--trace", "--site", str(tmp_path / "site"), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(COURSE_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout

    report = json.loads((out / "gpu_throughput.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == CONFIGS  # the order
    for name in ("course-eager", "course-compiled"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["samples_per_s"] > 0 and row["ms_per_step"] > 0 and row["peak_mem_gib"] > 0
        assert math.isfinite(row["loss"]) and row["loss"] == pytest.approx(math.log(4), abs=0.05)  # untrained: ln B
        assert row["mfu"] is None  # no peak for a CPU
    assert rows["course-eager"]["gflops_per_sample"] == rows["course-compiled"]["gflops_per_sample"] > 0
    for name in ("open_clip-eager", "open_clip-compiled"):
        row = rows[name]
        assert row["status"] in ("ok", "skipped"), row  # never FAILED, with or without open_clip
        if row["status"] == "skipped":
            assert row["note"] and ("open_clip" in row["note"] or "torchvision" in row["note"]), row
        else:  # same size, same count: the two models do the same work
            assert row["samples_per_s"] > 0 and math.isfinite(row["loss"])
            assert row["gflops_per_sample"] == pytest.approx(rows["course-eager"]["gflops_per_sample"], rel=0.01)

    # one markdown table with every row, the verdicts, WRA on the same device, the profile, the command
    assert "| configuration | status | samples/s |" in text
    for name in CONFIGS:
        assert f"| {name} | {rows[name]['status']} |" in text
    assert "course compiled / open_clip compiled" in text and "smoke run" in text
    assert "WRA (bench_wra.py --device cpu): IPOT 50 it (UNITER)" in text, text[-2000:]
    assert report["wra"]["setup"]["device"] == "cpu"
    assert "profile of course-eager" in text and "profile of course-compiled" in text
    assert "reproduce: python3 benchmarks/gpu_throughput.py --size cpu-tiny --device cpu" in text
    assert (out / "gpu_throughput.md").read_text().startswith("## GPU throughput run")
    assert (out / "trace_course-eager.json.gz").stat().st_size > 0  # names the device tool brings back
    assert (out / "trace_course-compiled.json.gz").stat().st_size > 0


def test_the_kernel_breakdown_sorts_device_time_by_kind():
    from types import SimpleNamespace

    script = _load_script()
    cuda, cpu = "DeviceType.CUDA", "DeviceType.CPU"
    events = [SimpleNamespace(key="sm90_xmma_gemm_bf16bf16_bf16f32", device_type=cuda, self_device_time_total=6000.0),
              SimpleNamespace(key="void pytorch_flash::flash_fwd_kernel<...>", device_type=cuda,
                              self_device_time_total=600.0),
              SimpleNamespace(key="cudnn_generated_fort_native_sdpa_sm90_flash_bprop", device_type=cuda,
                              self_device_time_total=400.0),  # "sm90": attention, not a matrix product
              SimpleNamespace(key="triton_per_fused_native_layer_norm_0", device_type=cuda,
                              self_device_time_total=2000.0),
              SimpleNamespace(key="void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
                              device_type=cuda, self_device_time_total=1000.0),
              SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=9999.0)]  # not a kernel
    lines = script.kernel_breakdown(events, steps=2, wall_ms=12.5)
    assert "kernels busy 80.0%" in lines[0] and "5.00 ms of kernels per step" in lines[0]
    assert "matrix products" in lines[1] and "3.00 ms/step" in lines[1] and "60.0%" in lines[1]
    assert any("Triton" in line and "20.0%" in line for line in lines)
    assert any("attention" in line and "10.0%" in line for line in lines)
    assert any("optimizer" in line and "10.0%" in line for line in lines)
    assert script.kernel_breakdown(events[-1:], 2, 12.5) == ["(the profiler recorded no GPU kernels)"]


def test_a_failing_configuration_is_a_row_and_the_rest_still_run(monkeypatch, capsys):
    script = _load_script()
    real = script.time_steps
    calls = {"n": 0}

    def first_one_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(script, "time_steps", first_one_fails)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--size", "cpu-tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
                            "--configs", "course-eager,course-compiled", "--compile-backend", "eager", "--no-wra",
                            "--no-install", "--budget-s", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "| course-eager | FAILED |" in text and "CUDA out of memory (simulated)" in text
    assert "| course-compiled | ok |" in text
    assert "WRA (bench_wra.py --device cpu): skipped: --no-wra" in text


def test_configurations_after_the_time_budget_are_skipped_rows(capsys):
    script = _load_script()
    threads = torch.get_num_threads()
    try:
        script.main(["--size", "cpu-tiny", "--device", "cpu", "--configs", "course-eager", "--no-wra",
                     "--budget-s", "1e-9"])
    finally:
        torch.set_num_threads(threads)
    assert "| course-eager | skipped |" in capsys.readouterr().out


def _fake_wheel(folder: Path, name: str, module: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel that pip installs (``module.VALUE == 42``)."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for member, content in files.items():
            z.writestr(member, content)
    return path


def test_a_missing_module_is_installed_from_the_wheels_folder_and_torch_never(tmp_path, monkeypatch):
    script = _load_script()
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _fake_wheel(wheels, "gt_fake_pkg", "gt_fake_pkg")
    _fake_wheel(wheels, "torch", "gt_fake_torch")  # a torch wheel in the folder must never be installed
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))

    assert "present" == script.ensure_module("json", site, wheels)
    note = script.ensure_module("gt_fake_pkg", site, wheels, needs={"gt_fake_pkg": "gt_fake_pkg"})
    assert note == "installed from gt_fake_pkg-1.0-py3-none-any.whl", note
    assert __import__("gt_fake_pkg").VALUE == 42 and str(site) in os.environ["PYTHONPATH"]
    sys.modules.pop("gt_fake_pkg", None)

    note = script.ensure_module("gt_fake_torch", site, wheels, needs={"torch": "gt_fake_torch"})
    assert "has no wheel for torch" in note and not (site / "gt_fake_torch").exists()
    assert "--no-install" in script.ensure_module("gt_nothing", site, wheels, install=False)


def test_flop_count_sees_through_nn_multihead_attention_fast_path():
    """In eval mode without gradients nn.MultiheadAttention runs one fused op that FlopCounterMode
    cannot see into (open_clip's CLIP was counted 29% short); course_lib.flops turns that path off."""
    from course_lib.flops import count_forward_flops

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    B, N, D = 2, 5, 16
    projections = 2 * N * D * (3 * D) + 2 * N * D * D  # in_proj (Q, K, V) and out_proj, per sample
    attention = 2 * 2 * N * N * D  # Q K^T and P V
    assert count_forward_flops(SelfAttention(), torch.randn(B, N, D)) == B * (projections + attention)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
