"""Environment check: ``python -m course_lib.doctor`` prints OK/FAIL per dependency, the versions
the course is tested with, and whether a GPU is seen. Paste its output into a bug report."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path

# import name -> distribution name in requirements.txt
PACKAGES = {
    "torch": "torch", "numpy": "numpy", "matplotlib": "matplotlib", "ot": "pot",
    "transformers": "transformers", "tokenizers": "tokenizers", "tqdm": "tqdm", "PIL": "pillow",
    "ipywidgets": "ipywidgets", "webdataset": "webdataset", "jupyterlab": "jupyterlab",
    "nbval": "nbval", "pytest": "pytest",
}


def pinned_versions() -> dict[str, str]:
    """``{distribution: version}`` from the repository's requirements.txt (empty when not found)."""
    path = Path(__file__).resolve().parent.parent / "requirements.txt"
    if not path.exists():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def check_packages() -> list[tuple[str, bool, str]]:
    pins, rows = pinned_versions(), []
    for module, dist in PACKAGES.items():
        try:
            version = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception as error:  # noqa: BLE001 - report any import failure
            rows.append((dist, False, f"cannot import {module}: {error}"))
            continue
        want = pins.get(dist)
        note = version if want is None or version.split("+")[0] == want else f"{version} (tested with {want})"
        rows.append((dist, True, note))
    return rows


def device_report() -> list[str]:
    import torch

    lines = [f"CPU threads: {torch.get_num_threads()} (cores: {os.cpu_count()})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, bf16: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append("GPU: none seen (the notebooks run on the CPU; SCALE='gpu' needs one)")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        lines.append("Apple MPS: available (best effort; the course is tested on CPU and CUDA)")
    return lines


def main() -> int:
    print(f"course_lib doctor | Python {platform.python_version()} on {platform.platform()}")
    ok = sys.version_info[:2] == (3, 11)
    print(f"{'OK' if ok else 'WARN':4} python 3.11 expected, found {platform.python_version()}")
    failed = False
    for dist, good, note in check_packages():
        print(f"{'OK' if good else 'FAIL':4} {dist:13} {note}")
        failed |= not good
    if not failed:
        for line in device_report():
            print(f"     {line}")
    print("doctor:", "FAIL (install with ./course.sh, see README)" if failed else "all dependencies import")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
