"""Reading RedNet weights of every kind, safely, and fitting them to a model: file readers, key conversion, the
architecture the tensors imply, and strict loading. Imports no model code, so :mod:`rednet.model` (timm's
pretrained hooks) and :mod:`rednet.checkpoint` (building the right model from a file) both use it.

Formats understood (all read without executing pickled code):
- rednet training checkpoints (``torch.save`` dict with ``model``, ``arch`` and ``model_args``);
- rednet released weights: safetensors with ``arch`` / ``model_args`` metadata;
- official mmcls files (``{'meta', 'state_dict', 'optimizer'}``), bare official state dicts, and
  backbone-only files (no ``backbone.`` prefix, no head);
- PaddleClas ``.pdparams`` (a pickle of numpy arrays), through a restricted unpickler.
"""
import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ['DEPTHS', 'Checkpoint', 'CheckpointError', 'is_rednet', 'read_checkpoint', 'to_rednet_keys',
           'infer_model_args', 'fit_state_dict', 'convert_state_dict', 'load_state_dict_strict', 'load_fitted',
           'load_weights', 'BLOCK_INVOLUTION_ARGS']

# RedNet's blocks per stage, by depth (:mod:`rednet.model` builds them; the tensors of a file reveal them)
DEPTHS: Dict[int, Tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is unsafe, or does not fit the model."""


def is_rednet(arch: str) -> bool:
    return arch.startswith('rednet')


# ---------------------------------------------------------------------------------------------------------
# reading files safely

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what numpy array reconstruction and plain containers need; refuses everything else."""
    _ALLOWED = {
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
        ('_codecs', 'encode'),  # protocol 2 carries array bytes as latin-1 text
        ('collections', 'OrderedDict'),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise CheckpointError(
                f'refusing to load {module}.{name}: a Paddle weights file holds only numpy arrays, and this one '
                f'asks to run other code. It may be malicious; nothing in it was executed.')
        if module.startswith('numpy.core'):
            module = 'numpy._core' + module[len('numpy.core'):]
        return super().find_class(module, name)


def _read_pdparams(path: Path) -> Dict[str, torch.Tensor]:
    with open(path, 'rb') as f:
        obj = _NumpyOnlyUnpickler(f).load()
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a dict of arrays in a .pdparams file, got {type(obj).__name__}')
    state_dict = {}
    for key, value in obj.items():
        if key == 'StructuredToParameterName@@':
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # some Paddle versions store (internal_name, array)
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f'{path}: entry {key!r} is a {type(value).__name__}, not an array')
        if value.dtype.kind not in 'biuf':  # object, string, ... arrays are not weights
            raise CheckpointError(f'{path}: entry {key!r} is an array of {value.dtype} (dtype kind '
                                  f'{value.dtype.kind!r}), not of numbers; this is not a Paddle weights file')
        state_dict[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state_dict


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{path}: refused to unpickle: the file holds more than tensors, dicts, strings and numbers, so it '
            f'may run code when loaded (torch.load with weights_only=True said: {str(e).splitlines()[0]}). '
            f'Nothing in it was executed. Re-save only the state dict, or convert it with scripts/convert.py '
            f'in a trusted environment.') from None
    except RuntimeError as e:
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({e})') from None


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as f:
        metadata = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, metadata


class Checkpoint(NamedTuple):
    """What a checkpoint file says: weights in this project's keys, the architecture, its arguments, and the
    data pipeline the weights expect (timm ``pretrained_cfg`` keys; empty when the file does not say)."""
    state_dict: Dict[str, torch.Tensor]
    arch: str
    model_args: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]


def _data_cfg_to_pretrained_cfg(data: Dict[str, Any], in_chans: int) -> Dict[str, Any]:
    """A training run's data config (``configs/data/*.yaml``) -> timm ``pretrained_cfg`` keys."""
    cfg = {}
    if data.get('img_size'):
        cfg['input_size'] = (in_chans, int(data['img_size']), int(data['img_size']))
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if data.get(key) is not None:
            cfg[key] = tuple(data[key]) if isinstance(data[key], (list, tuple)) else data[key]
    return cfg


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read any supported file, safely.

    ``arch`` and model arguments come from our own metadata when present; otherwise they are inferred from the
    tensors (depth from the block counts, stem kernel from the stem involution, classes from the head, the
    bottleneck involutions' ``kernel_size``, ``group_channels`` and ``reduction_ratio`` from their convs). The
    involution arguments our metadata lacks (files written before they existed) are inferred too; ``dilation``
    leaves no trace in the tensors, so only our own files carry it (others load with the official 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    arch, model_args, pretrained_cfg = None, {}, {}
    if path.suffix == '.safetensors':
        state_dict, metadata = _read_safetensors(path)
        arch = metadata.get('arch')
        model_args = json.loads(metadata.get('model_args', '{}'))
        pretrained_cfg = json.loads(metadata.get('pretrained_cfg', '{}'))
    elif path.suffix == '.pdparams':
        state_dict = _read_pdparams(path)
    else:
        obj = _read_torch(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f'{path}: expected a dict, got {type(obj).__name__}')
        if 'model' in obj and 'arch' in obj:  # rednet training checkpoint
            arch, model_args = obj['arch'], dict(obj.get('model_args') or {})
            state_dict = obj['model']
            config = obj.get('config') or {}
            if isinstance(config, str):
                import yaml
                config = yaml.safe_load(config) or {}
            pretrained_cfg = _data_cfg_to_pretrained_cfg(config.get('data') or {}, model_args.get('in_chans', 3))
        elif 'state_dict' in obj:  # mmcv save_checkpoint
            state_dict = obj['state_dict']
        else:
            state_dict = obj
    if arch is not None and not is_rednet(arch):  # a timm baseline trained by train.py: keys as saved
        return Checkpoint(state_dict, arch, model_args, pretrained_cfg)
    state_dict = to_rednet_keys(state_dict, source=str(path))
    inferred = infer_model_args(state_dict, source=str(path))
    if arch is None:
        arch = f'rednet{inferred.pop("depth")}'
        model_args = {**inferred, **model_args}
    else:
        model_args = {**{k: inferred[k] for k in BLOCK_INVOLUTION_ARGS}, **model_args}
    return Checkpoint(state_dict, arch, model_args, pretrained_cfg)


# ---------------------------------------------------------------------------------------------------------
# key conversion

# official (mmcls) key -> ours, applied in order after dropping the 'backbone.' prefix
_OFFICIAL_RULES = [
    (r'^head\.fc\.', 'fc.'),
    (r'^stem\.0\.', 'stem.conv1.'),
    (r'^stem\.1\.', 'stem.inv.'),
    (r'^stem\.2\.', 'stem.bn.'),
    (r'^stem\.4\.', 'stem.conv2.'),
    (r'^(layer\d+\.\d+)\.conv2\.', r'\1.inv.'),
    (r'\.inv\.conv1\.', '.inv.reduce.'),
    (r'\.inv\.conv2\.conv\.', '.inv.span.'),
]
_PADDLE_BN = {'_mean': 'running_mean', '_variance': 'running_var'}


def _is_paddle(state_dict: Dict[str, Any]) -> bool:
    return any(k.endswith(('._mean', '._variance')) for k in state_dict)


def to_rednet_keys(state_dict: Dict[str, Any], source: str = 'state dict') -> Dict[str, torch.Tensor]:
    """Rename official, Paddle or DDP-wrapped keys to this project's module names."""
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{source}: entries that are not tensors: {bad[:5]}')
    paddle = _is_paddle(state_dict)
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', 'backbone.', '_orig_mod.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if paddle:
            stem, _, leaf = key.rpartition('.')
            key = f'{stem}.{_PADDLE_BN.get(leaf, leaf)}'
            if key == 'fc.weight':
                value = value.t().contiguous()  # Paddle's Linear stores [in, out]
        for pattern, repl in _OFFICIAL_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if paddle:  # Paddle keeps no num_batches_tracked
        for key in [k for k in out if k.endswith('.running_mean')]:
            out.setdefault(key[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0))
    return out


def _stem_kernel_size(state_dict: Dict[str, torch.Tensor]) -> int:
    """K of the stem involution: its span conv has K*K*G outputs, G = input channels / 16."""
    groups = state_dict['stem.inv.span.weight'].shape[1] * 4 // 16  # span input = C/4
    return math.isqrt(state_dict['stem.inv.span.weight'].shape[0] // groups)


# the bottleneck involution arguments that the tensors' shapes determine
BLOCK_INVOLUTION_ARGS = ('kernel_size', 'group_channels', 'reduction_ratio')


def _block_involution_args(state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, int]:
    """``kernel_size``, ``group_channels`` and ``reduction_ratio`` of the bottleneck involutions.

    Each has a reduce conv (C/r, C) and a span conv (K*K*G, C/r) with G = C / group_channels groups. G divides
    C = 64 in the first stage, so G is a power of two, and K is odd: G is the power-of-two part of K*K*G and
    K*K its odd part. Every block must agree (the model has one setting for all).
    """
    found = {}
    for key, span in state_dict.items():
        m = re.match(r'(layer\d+\.\d+)\.inv\.span\.weight$', key)
        reduce = state_dict.get(f'{m.group(1)}.inv.reduce.conv.weight') if m else None
        if reduce is None:
            continue
        channels, kernel_map = reduce.shape[1], span.shape[0]
        groups = kernel_map & -kernel_map
        k = math.isqrt(kernel_map // groups)
        if k * k * groups != kernel_map or channels % groups or channels % reduce.shape[0]:
            raise CheckpointError(f'{source}: {key} has {kernel_map} outputs for {channels} channels, which is '
                                  f'K*K*G for no odd K and G dividing {channels}')
        found[m.group(1)] = (k, channels // groups, channels // reduce.shape[0])
    settings = set(found.values())
    if len(settings) > 1:
        raise CheckpointError(f'{source}: the bottleneck involutions differ in (kernel_size, group_channels, '
                              f'reduction_ratio): {sorted(settings)}; RedNet uses one setting for every block')
    return dict(zip(BLOCK_INVOLUTION_ARGS, settings.pop())) if settings else {}


def infer_model_args(state_dict: Dict[str, torch.Tensor], source: str = 'state dict') -> Dict[str, Any]:
    """Depth, stem kernel size, input channels, class count and the bottleneck involutions' kernel size,
    group channels and reduction ratio, from the tensors alone."""
    for key in ('stem.inv.span.weight', 'stem.conv1.conv.weight'):
        if key not in state_dict:
            raise CheckpointError(f'{source}: not a RedNet checkpoint (no {key!r} after key conversion; '
                                  f'first keys: {list(state_dict)[:5]})')
    stem_kernel_size = _stem_kernel_size(state_dict)
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf'layer{stage}\.(\d+)\.', k))}
        blocks.append(max(ids) + 1 if ids else 0)
    by_blocks = {v: k for k, v in DEPTHS.items()}
    if tuple(blocks) not in by_blocks:
        raise CheckpointError(f'{source}: blocks per stage {tuple(blocks)} match no RedNet depth '
                              f'({", ".join(f"{d}: {b}" for d, b in DEPTHS.items())})')
    fc = state_dict.get('fc.weight')
    return dict(depth=by_blocks[tuple(blocks)], stem_kernel_size=stem_kernel_size,
                in_chans=state_dict['stem.conv1.conv.weight'].shape[1],
                num_classes=fc.shape[0] if fc is not None else 0, **_block_involution_args(state_dict, source))


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint',
                           allow_missing_head: bool = False) -> None:
    """Load with every key accounted for; on mismatch, name the keys and shapes that differ."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not (allow_missing_head and k.startswith('fc.'))]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f'{source} does not fit {type(model).__name__}:']
        for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                             ('shape mismatches', shapes)):
            if items:
                lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:10]) +
                             (' ...' if len(items) > 10 else ''))
        raise CheckpointError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=not allow_missing_head)


def _check_block_involutions(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    inv = getattr(getattr(model, 'layer1', [None])[0], 'inv', None)
    file_args = _block_involution_args(state_dict, source)
    if inv is None or not file_args:
        return
    model_args = {k: getattr(inv, k) for k in BLOCK_INVOLUTION_ARGS}
    if file_args != model_args:
        fmt = ', '.join
        raise CheckpointError(
            f'{source} has bottleneck involutions with {fmt(f"{k}={v}" for k, v in file_args.items())} but the '
            f'model was built with {fmt(f"{k}={v}" for k, v in model_args.items())}; create it with '
            f'{fmt(f"{k}={v}" for k, v in file_args.items() if model_args[k] != v)}')


def fit_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str = 'checkpoint',
                   file_small_input: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """A state dict in this project's keys -> ``model``'s: a clear error when the file's stem kernel, its
    bottleneck involutions' shapes (or its recorded ``small_input``) differ from the model's; the head dropped
    when the class counts differ; the first conv adapted (as timm does) when the input channels differ."""
    file_k = _stem_kernel_size(state_dict)
    if file_k != model.stem.inv.kernel_size:
        raise CheckpointError(
            f'{source} has a stem involution with K={file_k} but the model was built with '
            f'stem_kernel_size={model.stem.inv.kernel_size}; create it with stem_kernel_size={file_k}')
    _check_block_involutions(state_dict, model, source)
    if file_small_input is not None and file_small_input != model.small_input:
        raise CheckpointError(f'{source} was trained with small_input={file_small_input}; create the '
                              f'model with small_input={file_small_input}')
    fc = state_dict.get('fc.weight')
    if fc is None or fc.shape[0] != model.num_classes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
    key = 'stem.conv1.conv.weight'
    in_chans = model.stem.conv1.conv.in_channels
    if state_dict[key].shape[1] != in_chans:  # e.g. RGB weights for a grayscale model, as timm does
        from timm.models import adapt_input_conv
        state_dict = {**state_dict, key: adapt_input_conv(in_chans, state_dict[key])}
    return state_dict


def convert_state_dict(state_dict: Dict[str, Any], model: nn.Module, source: str = 'checkpoint') \
        -> Dict[str, torch.Tensor]:
    """timm's ``checkpoint_filter_fn``: any supported layout (official, Paddle, ours) -> ``model``'s keys."""
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = to_rednet_keys(state_dict, source)
    infer_model_args(state_dict, source)  # a clear error for a file that is not a RedNet
    return fit_state_dict(state_dict, model, source)


def load_fitted(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                 file_small_input: Optional[bool]) -> bool:
    """Fit ``state_dict`` (already in our keys) to ``model`` and load it strictly; True if the head was kept."""
    state_dict = fit_state_dict(state_dict, model, source, file_small_input)
    head_loaded = any(k.startswith('fc.') for k in state_dict)
    load_state_dict_strict(model, state_dict, source, allow_missing_head=not head_loaded)
    return head_loaded


def load_weights(model: nn.Module, path: PathLike) -> None:
    """Load any supported file into an existing model (the head is kept fresh if class counts differ)."""
    ckpt = read_checkpoint(path)
    if not load_fitted(model, ckpt.state_dict, str(path), ckpt.model_args.get('small_input')) \
            and model.num_classes:
        warnings.warn(f'{path}: classifier not loaded (file has a different class count or none); '
                      f'the head of {model.num_classes} classes is freshly initialised')
