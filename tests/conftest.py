"""Unit-test settings: a non-interactive matplotlib backend (set here, not through MPLBACKEND,
which would leak into the notebook kernels and remove their inline figures), offline HF."""

import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
