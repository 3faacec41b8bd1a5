"""The schema of ``train.py``'s Hydra configuration (``configs/``), as typed dataclasses.

Registered in Hydra's ConfigStore as ``train_schema`` and put first in ``configs/train.yaml``'s defaults, so
every key and type on the command line is checked before any work: ``train.epocs=3`` or
``train.epochs=many`` fail at composition. :func:`check_overrides` turns Hydra's terse "key not in struct"
into a message listing the valid keys of that section.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

__all__ = ['ModelConfig', 'DataConfig', 'OptimizerConfig', 'ScheduleConfig', 'TrainSection', 'Config',
           'register_schema', 'check_overrides', 'INVOLUTION_KEYS', 'check_involution_config',
           'check_involution_overrides']


@dataclass
class ModelConfig:
    name: str = 'rednet50'                    # timm model name (rednet26 ... rednet152, resnet50, ...)
    small_input: Optional[bool] = None        # 32x32 stem; null = automatic: on when data.img_size <= 64
    stem_kernel_size: int = 3                 # RedNet stem involution kernel (7 = detection variant)
    kernel_size: int = 7                      # RedNet bottleneck involutions: kernel (odd)
    group_channels: int = 16                  # ... channels per group (divides 64: 1, 2, 4, ..., 64)
    reduction_ratio: int = 4                  # ... kernel generator reduction C -> C / r (divides 64)
    dilation: int = 1                         # ... tap spacing ("same" padding)
    involution_backend: str = 'auto'          # rednet.ops backend used by every involution
    fuse_span: Optional[bool] = None          # span conv fused into the CPU aggregation; null = where it pays
    pretrained: Optional[str] = None          # path of weights to start from (any format rednet.load_model reads)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


# the RedNet bottleneck involution keys of ModelConfig, passed to timm.create_model as they are
INVOLUTION_KEYS = ('kernel_size', 'group_channels', 'reduction_ratio', 'dilation')


def check_involution_config(model: Any) -> Optional[str]:
    """A message naming the key and its valid values when ``model.kernel_size`` ... cannot build the RedNet, or
    when they are changed for a model that has no involutions (a timm baseline); else None."""
    if str(model.name).startswith('rednet'):
        from .model import check_involution_args
        try:
            check_involution_args(**{k: model[k] for k in INVOLUTION_KEYS}, prefix='model.')
        except ValueError as e:
            return str(e)
        return None
    changed = [f'model.{k}={model[k]}' for k in INVOLUTION_KEYS if model[k] != getattr(ModelConfig, k)]
    if changed:
        return f'{", ".join(changed)}: the involution settings apply only to RedNet models, not {model.name}'
    return None


def check_involution_overrides(overrides: List[str]) -> Optional[str]:
    """Every value the command line gives ``model.kernel_size`` ... (sweeps such as ``3,5,7`` or ``range(3,10,2)``
    included), checked before Hydra runs anything: a multirun with one bad value fails before its first job."""
    keys = {f'model.{k}' for k in INVOLUTION_KEYS}
    wanted = [item for item in overrides if item.split('=', 1)[0].lstrip('+~') in keys and '=' in item]
    if not wanted:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from .model import check_involution_args
    try:
        parsed = OverridesParser.create().parse_overrides(wanted)
        jobs = [(o.key_or_group, list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()])
                for o in parsed]
    except (HydraException, ValueError, TypeError):
        return None  # a syntax Hydra reports itself, or a sweep without a finite list of values
    for key, values in jobs:
        for value in values:
            try:
                check_involution_args(**{key.split('.', 1)[1]: value}, prefix='model.')
            except ValueError as e:
                return str(e)
    return None


@dataclass
class DataConfig:
    name: str = 'imagenet'                    # imagenet | imagefolder | cifar10 | cifar100 | digits | synthetic
    root: Optional[str] = None                # data set directory
    train_split: str = 'train'                # sub-folder of root for training (folder data sets)
    val_split: str = 'val'                    # sub-folder of root for validation (folder data sets)
    num_classes: Optional[int] = None         # null = from the data set
    img_size: int = 224                       # training crop / model input size
    crop_pct: float = 0.875                   # eval: resize img_size / crop_pct, centre crop img_size
    interpolation: str = 'bilinear'
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # training augmentation
    train_crop: str = 'rrc'                   # rrc (RandomResizedCrop) | pad (random crop with padding) | none
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    crop_padding: int = 4                     # for train_crop=pad
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None        # timm string, e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    re_prob: float = 0.0                      # random erasing probability
    # loading
    workers: int = 8                          # DataLoader workers per process
    pin_memory: bool = True
    download: bool = True                     # CIFAR: download when missing and the network allows
    bad_images: str = 'error'                 # error | skip (skip unreadable images with a warning and a count)
    # synthetic
    train_size: int = 1281                    # synthetic: training samples
    val_size: int = 256                       # synthetic: validation samples


@dataclass
class OptimizerConfig:
    name: str = 'sgd'                         # any timm.optim.create_optimizer_v2 name ('sgd' is Nesterov)
    lr: float = 0.1                           # learning rate per `lr_base_batch` images of global batch
    lr_base_batch: Optional[int] = 256        # linear scaling reference; null = use lr as is
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_wd_norm_bias: bool = False             # true: no weight decay on BN and bias parameters
    betas: Optional[List[float]] = None       # Adam-style optimizers
    eps: Optional[float] = None


@dataclass
class ScheduleConfig:
    name: str = 'cosine'                      # cosine | constant
    per_step: bool = False                    # cosine per iteration instead of per epoch
    warmup_epochs: float = 5.0                # linear warmup, per iteration
    warmup_ratio: float = 0.25                # warmup starts at warmup_ratio * lr
    min_lr: float = 0.0                       # cosine floor


@dataclass
class TrainSection:
    epochs: int = 130
    batch_size: int = 32                      # per process
    grad_accum: int = 1                       # micro-batches per optimizer step
    seed: int = 0
    deterministic: bool = False
    resume: Optional[str] = None              # auto (run dir's last checkpoint, if any) | PATH
    device: Optional[str] = None              # null: cuda when available, else cpu
    threads: Optional[int] = None             # CPU threads per process (torch.set_num_threads); null = default
    amp: Optional[str] = None                 # null | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    label_smoothing: float = 0.1
    mixup: float = 0.0                        # mixup alpha (0 = off)
    cutmix: float = 0.0                       # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: Optional[float] = None         # max gradient norm (null = no clipping)
    clip_mode: str = 'norm'                   # norm | value | agc
    ema: bool = False
    ema_decay: float = 0.9999
    sync_bn: bool = False
    skip_nonfinite: bool = False              # skip steps whose loss is NaN/inf instead of stopping
    eval_every: int = 1                       # validate every N epochs (and always after the last)
    log_every: int = 20                       # optimizer steps between log lines (train.log) and step scalars
    dist_backend: Optional[str] = None        # null: nccl on CUDA, gloo on CPU
    save_best: bool = True
    progress: bool = True                     # tqdm progress bar (rank 0, only on a terminal)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)


def register_schema() -> None:
    ConfigStore.instance().store(name='train_schema', node=Config)


_SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'optimizer': OptimizerConfig, 'schedule': ScheduleConfig,
             'train': TrainSection}


def _groups() -> List[str]:
    """The config groups of ``configs/`` (``model``, ``data``, ...): a ``group=choice`` override picks a file."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / 'configs'
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else list(_SECTIONS)


def check_overrides(overrides: List[str]) -> Optional[str]:
    """A message naming the valid keys when an override sets a key the schema does not have, else None.

    Overrides are parsed with Hydra's own override parser (sweeps, ``+``/``++``/``~``, quoting). Group
    overrides are left to Hydra, whose message already lists the available options: our groups
    (``model=rednet26``) and any path with a ``/``, such as Hydra's own ``hydra/launcher=submitit_slurm``.
    Command-line flags (``-m``, ``--cfg job``) are skipped.
    """
    from dataclasses import fields
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    items = [o for o in overrides if '=' in o and not o.startswith('-')]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except OverrideParseException as e:
        return f'cannot parse the override: {e}'
    groups = _groups()
    for override, item in zip(parsed, items):
        key = override.key_or_group
        if '/' in key or key.split('.')[0] == 'hydra' or key in groups or key.startswith('model.kwargs.'):
            continue
        parts = key.split('.')
        if len(parts) == 1:
            if key in _SECTIONS:
                continue  # a whole section
            return (f'unknown config key {key!r}; top-level sections are: {", ".join(_SECTIONS)}; config groups: '
                    f'{", ".join(groups)} (set a value with e.g. train.epochs=10)')
        section, name = parts[0], parts[1]
        if section not in _SECTIONS:
            return f'unknown config section {section!r} in {item!r}; valid sections: {", ".join(_SECTIONS)}'
        valid = [f.name for f in fields(_SECTIONS[section])]
        if name not in valid:
            import difflib
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f' Did you mean {section}.{close[0]}?' if close else ''
            return (f'unknown config key {key!r}.{hint} Valid keys of {section!r}: {", ".join(valid)}')
    return None
