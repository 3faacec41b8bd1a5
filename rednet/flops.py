"""Counting RedNet's FLOPs, the involution included (generic counters miss it or count unfold's copy).

Convention (``count_flops``), one multiply-add = one FLOP, as in the paper's ResNet-style tables:
- convolutions: output elements x (input channels / groups) x kernel area;
- linear layers: input elements x output features;
- involution aggregation: output elements x K*K (its kernel generator's convs count as convolutions);
- with ``elementwise=True`` (the default, what the mmcv counter of the paper's time did): also conv biases
  (output elements), BatchNorm 2 x input elements (affine), ReLU output elements, every pooling input elements. With a K=3 stem this lands 0.4-1.2%
  below the paper's numbers (with the K=7 stem of the detection variant, 0.3%).
"""
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d

from .model import Involution


def count_flops(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), elementwise: bool = True) -> int:
    """FLOPs (multiply-adds) of one forward pass of ``model`` on one image of ``input_size``."""
    total = 0

    # the span conv (C/4 -> K*K*G) may be fused into the aggregation and never run as a module: it is counted
    # with its involution, the same whichever involution backend runs
    spans = {id(m.span) for m in model.modules() if isinstance(m, Involution)}

    def conv(m: nn.Conv2d, inp, out):
        nonlocal total
        if id(m) in spans:
            return
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total += out.numel() if (m.bias is not None and elementwise) else 0

    def linear(m: nn.Linear, inp, out):
        nonlocal total
        total += inp[0].numel() * m.out_features

    def involution(m: Involution, inp, out):
        nonlocal total
        total += out.numel() * m.kernel_size * m.kernel_size
        kernel_map = out.shape[0] * m.span.out_channels * out.shape[2] * out.shape[3]
        total += kernel_map * m.span.in_channels + (kernel_map if elementwise else 0)

    def batchnorm(m: nn.BatchNorm2d, inp, out):
        nonlocal total
        total += inp[0].numel() * (2 if m.affine else 1)

    def activation(m, inp, out):
        nonlocal total
        total += out.numel()

    def pooling(m, inp, out):
        nonlocal total
        total += inp[0].numel()

    hooks = {nn.Conv2d: conv, nn.Linear: linear, Involution: involution}
    if elementwise:
        hooks.update({nn.BatchNorm2d: batchnorm, nn.ReLU: activation, nn.MaxPool2d: pooling,
                      nn.AvgPool2d: pooling, SelectAdaptivePool2d: pooling})
    handles = [m.register_forward_hook(fn) for m in model.modules() for cls, fn in hooks.items()
               if isinstance(m, cls)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
