"""Count forward FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` and compare fusion styles.

``FlopCounterMode`` counts the matrix products (``mm``, ``addmm``, ``bmm``, convolutions, fused
attention), 2 FLOPs per multiply-add; element-wise work (softmax, LayerNorm, GELU, bias adds) is not
counted, as in the usual "6 N D" estimates. A ``Linear(d_in, d_out)`` on ``N`` tokens costs
``2 N d_in d_out``. PyTorch registers no formula for the CPU kernel of
``scaled_dot_product_attention``; we add one (the same as for the GPU kernels:
``4 B H Nq Nk d``), so CPU and GPU counts agree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from course_lib.utils import count_parameters


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_flops(module: nn.Module, *example_inputs, **example_kwargs) -> int:
    """Forward FLOPs of ``module(*example_inputs, **example_kwargs)`` (no gradient is computed)."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        module(*example_inputs, **example_kwargs)
    return int(counter.get_total_flops())


def compare_fusion_styles(dim: int = 64, num_heads: int = 4, num_layers: int = 2, text_len: int = 16,
                          image_len: int = 65, batch_size: int = 1, styles=None, **options) -> list[dict]:
    """One row ``{"name", "params", "flops"}`` per fusion style, all built with the same sizes.

    ``flops`` is for one forward pass over ``batch_size`` pairs of ``text_len`` text and ``image_len``
    image tokens (cpu-tiny: 16 text tokens, 64 patches + [CLS] = 65). ``styles``: names to compare
    (default: all); ``options`` go to every style's config.
    """
    from course_lib.fusion.registry import FUSION_STYLES, build_fusion

    names = list(FUSION_STYLES) if styles is None else list(styles)
    rows = []
    for name in names:
        style = build_fusion(name, dim=dim, num_heads=num_heads, num_layers=num_layers, **options)
        rows.append({"name": name, "params": count_parameters(style),
                     "flops": style.flops(batch_size, text_len, image_len)})
    return rows


def format_fusion_table(rows: list[dict]) -> str:
    """The rows of ``compare_fusion_styles`` as a Markdown table (parameters in K, FLOPs in MFLOP)."""
    if not rows or not all({"name", "params", "flops"} <= set(r) for r in rows):
        raise ValueError("rows must be a non-empty list of dicts with 'name', 'params' and 'flops' "
                         "(the output of compare_fusion_styles)")
    lines = ["| style | params (K) | forward MFLOP |", "| --- | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['params'] / 1e3:.1f} | {r['flops'] / 1e6:.2f} |" for r in rows]
    return "\n".join(lines)
