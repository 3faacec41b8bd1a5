"""Reference involution aggregation: the unfold math of the official "naive" implementation.

Materialises K*K shifted copies of the input (memory-hungry, slow), which makes it easy to read and
the ground truth every fast backend is tested against.
"""
import torch
import torch.nn.functional as F


def involution_reference(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
) -> torch.Tensor:
    n, c, _, _ = x.shape
    _, g, k, _, h_out, w_out = weight.shape
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (N, C*K*K, H_out*W_out)
    cols = cols.view(n, g, c // g, k * k, h_out, w_out)
    out = (cols * weight.reshape(n, g, 1, k * k, h_out, w_out)).sum(dim=3)
    return out.reshape(n, c, h_out, w_out)
