"""Building the right model from a checkpoint file alone, and writing released weights.

Reading and key conversion live in :mod:`rednet.weights` (which the model's timm hooks use too); their names are
re-exported here, where they have always been.
"""
import json
from typing import Any, Dict

import torch.nn as nn

from .engine import atomic_write
from .model import timm_small_input_stem
from .weights import (BLOCK_INVOLUTION_ARGS, Checkpoint, CheckpointError, PathLike, convert_state_dict,
                      fit_state_dict, infer_model_args, is_rednet, load_fitted, load_state_dict_strict, load_weights,
                      read_checkpoint, to_rednet_keys)

__all__ = ['Checkpoint', 'load_model', 'model_from_checkpoint', 'load_weights', 'read_checkpoint',
           'convert_state_dict', 'fit_state_dict', 'infer_model_args', 'to_rednet_keys', 'is_rednet',
           'load_state_dict_strict', 'save_released', 'convert_checkpoint', 'CheckpointError']

# what a released safetensors file carries about its data pipeline (timm pretrained_cfg keys)
RELEASE_CFG_KEYS = ('num_classes', 'input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std')


def load_model(path: PathLike, **overrides: Any) -> nn.Module:
    """Build the right RedNet from a checkpoint file alone and load its weights.

    Args:
        path: any supported checkpoint (ours, official mmcls, backbone-only, PaddleClas ``.pdparams``).
        **overrides: model arguments that replace the file's (e.g. ``num_classes`` for a new head,
            ``involution_backend``). A different ``num_classes`` keeps the backbone and starts a new head.
    """
    return model_from_checkpoint(read_checkpoint(path), str(path), **overrides)


def model_from_checkpoint(ckpt: Checkpoint, source: str = 'checkpoint', **overrides: Any) -> nn.Module:
    """:func:`load_model` for a checkpoint already read with :func:`read_checkpoint`."""
    import timm
    if not is_rednet(ckpt.arch):
        return _baseline_from_checkpoint(ckpt, source, **overrides)
    model = timm.create_model(ckpt.arch, **{**ckpt.model_args, **overrides})
    small_input = None if 'small_input' in overrides else ckpt.model_args.get('small_input')
    if load_fitted(model, ckpt.state_dict, source, small_input):  # the data pipeline of the file's classifier
        model.pretrained_cfg = {**model.pretrained_cfg, **ckpt.pretrained_cfg}
    return model


def _baseline_from_checkpoint(ckpt: Checkpoint, source: str, **overrides: Any) -> nn.Module:
    """A timm baseline (``model=resnet26`` ...) that ``train.py`` trained: the timm model, the small-input stem
    when it was trained with one, the weights loaded strictly (a new head when ``num_classes`` differs)."""
    import timm
    rednet_only = sorted(set(overrides) & {'involution_backend', 'fuse_span', 'stem_kernel_size', 'dilation',
                                           *BLOCK_INVOLUTION_ARGS})
    if rednet_only:
        raise CheckpointError(f'{source} holds a {ckpt.arch}, which has no {", ".join(rednet_only)}')
    args = {**ckpt.model_args, **overrides}
    small_input = args.pop('small_input', False)
    model = timm.create_model(ckpt.arch, **args)
    if small_input:
        timm_small_input_stem(model)
    head = model.pretrained_cfg.get('classifier', 'fc')
    state_dict = ckpt.state_dict
    new_head = model.num_classes != ckpt.model_args.get('num_classes', model.num_classes)
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head + '.')}
    load_state_dict_strict(model, state_dict, source, allow_missing_head=new_head)
    if not new_head:
        model.pretrained_cfg = {**model.pretrained_cfg, **ckpt.pretrained_cfg}
    return model


def save_released(model: nn.Module, path: PathLike, arch: str, model_args: Dict[str, Any],
                  **cfg_overrides: Any) -> None:
    """Write our released-weights format: safetensors weights plus the metadata that rebuilds the model
    (architecture name and arguments) and its data pipeline (class count, input size, crop_pct, mean/std)."""
    from safetensors.torch import save_file
    cfg = {k: model.pretrained_cfg[k] for k in RELEASE_CFG_KEYS if k in getattr(model, 'pretrained_cfg', {})}
    cfg.update(cfg_overrides, num_classes=model.num_classes)
    model_args = {**model_args, 'num_classes': model.num_classes}
    metadata = {'format': 'rednet', 'arch': arch, 'model_args': json.dumps(model_args),
                'pretrained_cfg': json.dumps(cfg)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def convert_checkpoint(src: PathLike, dst: PathLike, **cfg_overrides: Any) -> nn.Module:
    """Any supported checkpoint (official, PaddleClas, ours) -> our released safetensors file."""
    ckpt = read_checkpoint(src)
    model = model_from_checkpoint(ckpt, str(src))
    save_released(model, dst, ckpt.arch, ckpt.model_args, **{**ckpt.pretrained_cfg, **cfg_overrides})
    return model
