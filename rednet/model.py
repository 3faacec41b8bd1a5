"""RedNet: ResNet with every bottleneck's 3x3 convolution replaced by a 7x7 involution.

Paper: `Involution: Inverting the Inherence of Convolution for Visual Recognition` (Li et al., CVPR 2021)
- https://arxiv.org/abs/2103.06255

The architecture follows the authors' code (d-li14/involution, mmcls backbone) exactly: same stem (3x3 conv,
K=3 involution, BN, ReLU, 3x3 conv, max-pool), same "pytorch"-style bottleneck with the stride on the
involution, same initialisation (last BN of each residual branch zero-initialised). Parameter counts equal
the official code's. Differences, each documented where it lives:
- odd input sizes work: the kernel generator's stride pooling uses ``ceil_mode=True``, which equals the
  official ``AvgPool2d(s, s)`` on even sizes and gives one kernel per output pixel on odd ones;
- ``small_input=True`` builds a stem for 32x32 data sets (CIFAR, digits): stride-1 first conv and no max-pool;
- ``stem_kernel_size=7`` builds the detection/segmentation variant of the stem;
- the bottleneck involutions' hyperparameters (``kernel_size``, ``group_channels``, ``reduction_ratio``,
  ``dilation``) are arguments, for the paper's ablations; the defaults (7, 16, 4, 1) are the official model.
  The stem's involution keeps its official group channels (16) and reduction (4).
"""
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .ops import involution, involution_fused, not_eager, resolve_backend
from .weights import DEPTHS, convert_state_dict, load_weights

__all__ = ['Involution', 'Bottleneck', 'RedNet', 'DEPTHS', 'STAGE_WIDTHS', 'FUSE_MIN_BYTES', 'check_involution_args',
           'timm_small_input_stem']

# the bottlenecks' mid widths (the involutions' channel counts), by stage
STAGE_WIDTHS: Tuple[int, int, int, int] = (64, 128, 256, 512)


def _divisors(n: int) -> Tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def check_involution_args(kernel_size: int = 7, group_channels: int = 16, reduction_ratio: int = 4,
                          dilation: int = 1, widths: Tuple[int, ...] = STAGE_WIDTHS, prefix: str = '') -> None:
    """Raise ``ValueError`` naming the key and its valid values for involution hyperparameters that cannot
    build a layer of every width in ``widths``.

    ``prefix`` is put before each key in the message (``'model.'`` for the Hydra config).
    """
    common = math.gcd(*widths)
    valid = ', '.join(map(str, _divisors(common)))
    width_list = ', '.join(map(str, widths))
    checks = (
        ('kernel_size', kernel_size, kernel_size >= 1 and kernel_size % 2 == 1,
         'an odd number >= 1 (the paper ablates 3, 5, 7, 9)'),
        ('group_channels', group_channels, group_channels >= 1 and common % group_channels == 0,
         f'one of {valid} (it must divide every involution width: {width_list})'),
        ('reduction_ratio', reduction_ratio, reduction_ratio >= 1 and common % reduction_ratio == 0,
         f'one of {valid} (it must divide every involution width: {width_list})'),
        ('dilation', dilation, dilation >= 1, 'an integer >= 1'),
    )
    for key, value, ok, valid_values in checks:
        if not isinstance(value, int) or isinstance(value, bool) or not ok:
            raise ValueError(f'{prefix}{key}={value!r} is not valid: use {valid_values}')

# fuse_span=None fuses the span conv into the aggregation where the layer's kernel map (N * K*K*G * H_out * W_out
# values, in float32 or wider) would take at least this many bytes: where it no longer stays in the last-level
# cache between the span conv and the aggregation, recomputing it chunk by chunk is cheaper than moving it
# through memory (measured on the 2-core CPU with 32 MB of L3, see Involution and scripts/benchmark.py
# --fuse-only)
FUSE_MIN_BYTES = {'native': 16 << 20, 'cpp': 32 << 20}


class Involution(nn.Module):
    """Involution layer: per-pixel kernels generated from the input, shared across a group's channels.

    Kernel generation (official): optional ``AvgPool2d(stride)`` -> 1x1 conv C -> C/r (no bias) + BN + ReLU
    -> 1x1 conv C/r -> K*K*G (bias), with G = C / ``group_channels`` groups and r = ``reduction_ratio``
    (official: 16 and 4). Aggregation: :func:`rednet.ops.involution`, with ``dilation`` and the "same" padding
    ``dilation * (K - 1) // 2``, so the output is ``ceil(H / stride) x ceil(W / stride)`` for every K and
    dilation. Parameters: C*C/r + 2*C/r (reduce conv, BN) + (C/r)*K*K*G + K*K*G (span conv, bias).

    Unlike a convolution it keeps the channel count (C in, C out) and has no padding argument; the stride
    comes through the kernel generator's average pooling. As a drop-in for a KxK conv with equal in/out
    channels: ``nn.Conv2d(c, c, 3, stride, 1)`` -> ``Involution(c, 7, stride)``.

    ``fuse_span``: with the ``native`` or ``cpp`` backend in eager mode the last conv can be fused into the
    aggregation (:func:`rednet.ops.involution_fused`): the K*K*G-channel kernel map (3x the feature map) is never
    stored whole and is recomputed chunk by chunk in backward. Whether that pays depends on whether the kernel
    map would stay in cache anyway. Measured on the 2-core CPU (32 MB L3), one layer's training fwd+bwd, fused /
    unfused time over several runs: ``native`` 0.66-0.94 at (8, 64, 56x56) (a 19 MB kernel map), 0.57-0.59 at
    (64, 64, 32x32) (49 MB), 1.02-1.05 at (8, 128, 28x28) (9 MB), 1.11-1.23 on smaller maps; ``cpp`` (whose
    unfused aggregation is faster) 0.89-1.15 at (8, 64, 56x56), 0.44-0.65 at (64, 64, 32x32), 1.10-2.50 on
    smaller ones. ``None`` (default) therefore fuses where the kernel map would take at least
    :data:`FUSE_MIN_BYTES` for the backend; ``True``/``False`` force it on/off everywhere (``True``: least
    memory, RedNet-50 training peak 1.08x ResNet-50's instead of 1.26x unfused).
    ``reference``/``triton``, ``torch.compile`` and export always run unfused. Set the attribute on the modules
    to switch a built model.
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int = 7,
            stride: int = 1,
            group_channels: int = 16,
            reduction_ratio: int = 4,
            dilation: int = 1,
            backend: str = 'auto',
            fuse_span: Optional[bool] = None,
    ):
        super().__init__()
        check_involution_args(kernel_size, group_channels, reduction_ratio, dilation, (channels,))
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f'stride={stride!r} is not valid: use an integer >= 1')
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.group_channels = group_channels
        self.reduction_ratio = reduction_ratio
        self.groups = channels // group_channels
        self.backend = backend
        # ceil_mode=True equals the official AvgPool2d(s, s) on even sizes and keeps one kernel per output
        # pixel on odd sizes (where the official code crashes or reads out of bounds)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 \
            else nn.Identity()
        self.reduce = ConvNormAct(channels, channels // reduction_ratio, 1)
        self.span = nn.Conv2d(channels // reduction_ratio, kernel_size * kernel_size * self.groups, 1)
        # fuse the span conv into the native/cpp aggregation (eager only): the K*K*G-channel kernel map is then
        # computed chunk by chunk and never stored whole (:mod:`rednet.ops.fused`); same parameters and math.
        # None = where the kernel map would outgrow the cache (FUSE_MIN_BYTES)
        self.fuse_span = fuse_span

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(self.pool(x))  # one row of r per output pixel
        return involution_layer(x, r, self.span.weight, self.span.bias,
                                (self.kernel_size, self.stride, self.dilation), self.backend, self.fuse_span)


@torch.fx.wrap  # one node of an FX graph (torch.fx.symbolic_trace, create_feature_extractor, timm's FX features)
@torch.jit.ignore  # runs as Python inside a TorchScript model
def involution_layer(x: torch.Tensor, r: torch.Tensor, span_weight: torch.Tensor, span_bias: Optional[torch.Tensor],
                     geometry: Tuple[int, int, int], backend: str, fuse_span: Optional[bool]) -> torch.Tensor:
    """:class:`Involution` after its reduce step: the span conv (1x1, C/r -> K*K*G) makes the kernel map, which
    :func:`rednet.ops.involution` applies to ``x`` with ``geometry`` = (K, stride, dilation); or both fused
    (:func:`rednet.ops.involution_fused`) where ``fuse_span`` and the backend say so (see :class:`Involution`)."""
    kernel_size, stride, dilation = geometry
    fused_backend = _fuse_with(x, r, span_weight.shape[0], backend, fuse_span)
    if fused_backend:
        return involution_fused(x, r, span_weight, span_bias, kernel_size, stride, dilation=dilation,
                                backend=fused_backend)
    weight = F.conv2d(r, span_weight, span_bias)
    n, _, h, w = weight.shape
    weight = weight.view(n, -1, kernel_size, kernel_size, h, w)
    return involution(x, weight, stride=stride, dilation=dilation, backend=backend)


def _fuse_with(x: torch.Tensor, r: torch.Tensor, kmap_channels: int, backend: str,
               fuse_span: Optional[bool]) -> Optional[str]:
    """The backend to run the span conv fused with, or None for unfused (off, compile/export, other backends, or
    ``fuse_span=None`` where the kernel map stays small enough for the cache)."""
    if fuse_span is False or not_eager(compiling=True):
        return None
    backend = resolve_backend(backend, x)
    if backend not in FUSE_MIN_BYTES:
        return None
    if fuse_span:
        return backend
    if x.device.type != 'cpu':  # FUSE_MIN_BYTES was measured on a CPU; on GPUs fusing was not measured to pay
        return None
    kmap_bytes = r.shape[0] * kmap_channels * r.shape[-2] * r.shape[-1] * max(4, x.element_size())
    return backend if kmap_bytes >= FUSE_MIN_BYTES[backend] else None


class Bottleneck(nn.Module):
    """1x1 conv -> 7x7 involution (carrying the stride) -> 1x1 conv, plus shortcut.

    ``involution_args``: further :class:`Involution` arguments (``group_channels``, ``reduction_ratio``,
    ``dilation``).
    """
    expansion = 4

    def __init__(
            self,
            in_chs: int,
            mid_chs: int,
            stride: int = 1,
            kernel_size: int = 7,
            involution_backend: str = 'auto',
            drop_path: float = 0.0,
            **involution_args: Any,
    ):
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.inv = Involution(mid_chs, kernel_size, stride, backend=involution_backend, **involution_args)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # stochastic depth
        self.act3 = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)
        nn.init.zeros_(self.bn3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.inv(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class Stem(nn.Module):
    """3x3 conv (stride 2) -> involution (K=3, or 7 for detection) -> BN, ReLU -> 3x3 conv."""

    def __init__(
            self,
            in_chans: int = 3,
            width: int = 64,
            kernel_size: int = 3,
            stride: int = 2,
            involution_backend: str = 'auto',
    ):
        super().__init__()
        self.conv1 = ConvNormAct(in_chans, width // 2, 3, stride=stride, padding=1)
        self.inv = Involution(width // 2, kernel_size, 1, backend=involution_backend)
        self.bn = nn.BatchNorm2d(width // 2)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = ConvNormAct(width // 2, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.inv(self.conv1(x)))))


class RedNet(nn.Module):
    """RedNet classifier / backbone, with the timm model API."""

    def __init__(
            self,
            layers: Tuple[int, int, int, int] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            stem_kernel_size: int = 3,
            small_input: bool = False,
            kernel_size: int = 7,
            group_channels: int = 16,
            reduction_ratio: int = 4,
            dilation: int = 1,
            global_pool: str = 'avg',
            involution_backend: str = 'auto',
            fuse_span: Optional[bool] = None,
            zero_init_last: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        """
        Args:
            layers: bottleneck blocks per stage.
            num_classes: classifier outputs (0 for no classifier).
            in_chans: input image channels.
            stem_kernel_size: kernel of the stem's involution, 3 (classification) or 7 (detection variant).
            small_input: stem for 32x32 images: stride-1 first conv and no max-pool (overall stride 8).
            kernel_size: kernel of the bottlenecks' involutions (odd; the paper ablates 3, 5, 7, 9).
            group_channels: channels per group of the bottlenecks' involutions (G = C / group_channels kernels
                per pixel); must divide every stage width 64, 128, 256, 512.
            reduction_ratio: the kernel generators' reduction (C -> C / reduction_ratio -> K*K*G); must divide 64.
            dilation: spacing of the bottlenecks' involution taps, with "same" padding ``dilation * (K - 1) // 2``.
            global_pool: timm pooling type of the head.
            involution_backend: backend of :func:`rednet.ops.involution` used by every involution.
            fuse_span: fuse each involution's span conv into the native/cpp aggregation: ``None`` where the
                kernel map would outgrow the cache, ``True`` everywhere (least memory), ``False`` nowhere
                (see :class:`Involution`).
            zero_init_last: zero-initialise the last BN of every residual branch.
            drop_rate: dropout before the classifier (training only).
            drop_path_rate: stochastic depth of the residual branches, rising linearly from 0 at the first block
                to ``drop_path_rate`` at the last (timm's ResNet rule).
        """
        super().__init__()
        check_involution_args(kernel_size, group_channels, reduction_ratio, dilation)
        if not isinstance(stem_kernel_size, int) or stem_kernel_size < 1 or stem_kernel_size % 2 == 0:
            raise ValueError(f'stem_kernel_size={stem_kernel_size!r} is not valid: use an odd number '
                             f'(official: 3; 7 for the detection variant)')
        inv_args = dict(group_channels=group_channels, reduction_ratio=reduction_ratio, dilation=dilation)
        self.num_classes = num_classes
        self.small_input = small_input
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem_stride = 1 if small_input else 2
        self.stem = Stem(in_chans, 64, stem_kernel_size, stem_stride, involution_backend)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=stem_stride, module='stem')]

        in_chs, reduction = 64, stem_stride * (1 if small_input else 2)
        block_idx, num_blocks_total = 0, sum(layers)
        for i, (num_blocks, mid_chs) in enumerate(zip(layers, STAGE_WIDTHS)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(num_blocks):
                drop_path = drop_path_rate * block_idx / max(num_blocks_total - 1, 1)
                blocks.append(Bottleneck(in_chs, mid_chs, stride if j == 0 else 1, kernel_size, involution_backend,
                                         drop_path, **inv_args))
                in_chs = mid_chs * Bottleneck.expansion
                block_idx += 1
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'layer{i + 1}'))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        for m in self.modules():
            if isinstance(m, Involution):
                m.fuse_span = fuse_span
        self.init_weights(zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^stem|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def set_involution_backend(self, backend: str) -> None:
        """Switch every involution of the model to another :func:`rednet.ops.involution` backend."""
        for m in self.modules():
            if isinstance(m, Involution):
                m.backend = backend

    def load_pretrained(self, path: str) -> None:
        """timm's hook for ``pretrained=True`` with a local file: any format :func:`rednet.load_model` reads."""
        load_weights(self, path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(nn.Sequential(self.layer1, self.layer2, self.layer3, self.layer4), x)
        x = self.layer1(x)  # written out, not looped over a list: TorchScript compiles this
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API: the stem output (index 0) and the four stages (1-4), as in
        ``feature_info``. ``indices``: the last n if an int, all if None, else those listed; ``norm`` is accepted
        for the API (RedNet has no final norm); ``stop_early`` skips the stages after the last one taken."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(5, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            stages = stages[:max_index]
        for idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and the head) that the intermediates at ``indices`` do not need; returns the
        indices kept."""
        take_indices, max_index = feature_take_indices(5, indices)
        for i in range(max_index + 1, 5):
            setattr(self, f'layer{i}', nn.Sequential())  # empty: passes its input through, as timm does
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < 4:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < 4:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def timm_small_input_stem(model: nn.Module) -> nn.Module:
    """Give a timm ResNet (``resnet26``, ``resnet50`` ...) the stem RedNet's ``small_input=True`` uses for 32x32
    images: a 3x3 stride-1 first conv and no max-pool. ``train.py`` and :func:`rednet.load_model` both use it, so
    a baseline checkpoint rebuilds itself."""
    if not (isinstance(getattr(model, 'conv1', None), nn.Conv2d) and hasattr(model, 'maxpool')):
        raise ValueError(f'small_input is only implemented for RedNet and timm ResNets (a Conv2d conv1 and a '
                         f'maxpool), not {type(model).__name__}')
    model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RedNet) -> Dict[str, torch.Tensor]:
    """Convert an official (mmcls), PaddleClas or rednet state dict to this model's keys."""
    return convert_state_dict(state_dict, model)


def _create_rednet(variant: str, pretrained: bool = False, **kwargs) -> RedNet:
    overlay = kwargs.get('pretrained_cfg_overlay')
    if overlay and overlay.get('file'):
        # a local file may be official, PaddleClas or ours: RedNet.load_pretrained reads every kind safely
        kwargs['pretrained_cfg_overlay'] = {'custom_load': True, **overlay}
    return build_model_with_cfg(
        RedNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': 'fc',
        'paper_ids': 'arXiv:2103.06255', 'paper_name': 'Involution: Inverting the Inherence of Convolution '
                                                     'for Visual Recognition',
        'origin_url': 'https://github.com/d-li14/involution', 'license': 'mit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'rednet26.in1k': _cfg(),
    'rednet38.in1k': _cfg(),
    'rednet50.in1k': _cfg(),
    'rednet101.in1k': _cfg(),
    'rednet152.in1k': _cfg(),
})


@register_model
def rednet26(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-26 (9.23M parameters)."""
    return _create_rednet('rednet26', pretrained, **dict(layers=DEPTHS[26], **kwargs))


@register_model
def rednet38(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-38 (12.39M parameters)."""
    return _create_rednet('rednet38', pretrained, **dict(layers=DEPTHS[38], **kwargs))


@register_model
def rednet50(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-50 (15.54M parameters)."""
    return _create_rednet('rednet50', pretrained, **dict(layers=DEPTHS[50], **kwargs))


@register_model
def rednet101(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-101 (25.65M parameters)."""
    return _create_rednet('rednet101', pretrained, **dict(layers=DEPTHS[101], **kwargs))


@register_model
def rednet152(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-152 (33.98M parameters)."""
    return _create_rednet('rednet152', pretrained, **dict(layers=DEPTHS[152], **kwargs))
