"""The schema of ``train.py``'s Hydra configuration (``configs/``), as typed dataclasses: the one place that holds
the defaults.

Registered in Hydra's ConfigStore as ``train_schema`` and put first in ``configs/train.yaml``'s defaults, so
every key, type and choice on the command line is checked before any work: ``train.epocs=3``,
``train.epochs=many`` or ``data.train_crop=rnd`` fail at composition. The defaults are the paper's ImageNet
recipe (official mmcls configs ``rednet*_b32x64_warmup_coslr_imagenet``); the group files of ``configs/`` state
only what differs from them, and ``configs/recipe/`` holds the training recipes of the small data sets.

Choices are :class:`Choice` enums, which behave as their plain string (``==``, ``in``, dict keys, f-strings,
JSON, interpolation); :func:`to_plain` gives the config with plain strings, which is what runs use, save in
checkpoints (``torch.load(weights_only=True)`` admits no enums) and compare. :func:`check_overrides` turns
Hydra's terse "key not in struct" into a message listing the valid keys of that section, and names the valid
values of a choice.
"""
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

from hydra.core.config_store import ConfigStore

__all__ = ['Choice', 'InvolutionBackend', 'DataName', 'TrainCrop', 'Interpolation', 'BadImages', 'ScheduleName',
           'Amp', 'ClipMode', 'ModelConfig', 'DataConfig', 'OptimizerConfig', 'ScheduleConfig', 'TrainSection',
           'Config', 'register_schema', 'to_plain', 'choice_problem', 'check_overrides', 'INVOLUTION_KEYS',
           'check_involution_config', 'check_involution_overrides']


class Choice(str, enum.Enum):
    """A config choice: OmegaConf accepts only its members' names (each name is its value) and names the valid
    ones otherwise. A member is a ``str`` equal to its value, and prints as it (``str``, f-strings, JSON)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


class InvolutionBackend(Choice):  # rednet.ops.BACKENDS
    auto = 'auto'
    reference = 'reference'
    native = 'native'
    functional = 'functional'
    cpp = 'cpp'
    triton = 'triton'


class DataName(Choice):  # rednet.data.DATASETS
    imagenet = 'imagenet'
    imagefolder = 'imagefolder'
    cifar10 = 'cifar10'
    cifar100 = 'cifar100'
    digits = 'digits'
    synthetic = 'synthetic'


class TrainCrop(Choice):
    rrc = 'rrc'      # RandomResizedCrop
    pad = 'pad'      # random crop with zero padding
    none = 'none'


class Interpolation(Choice):  # timm's str_to_interp_mode, train and eval
    bilinear = 'bilinear'
    bicubic = 'bicubic'
    nearest = 'nearest'
    box = 'box'
    hamming = 'hamming'
    lanczos = 'lanczos'


class BadImages(Choice):
    error = 'error'
    skip = 'skip'


class ScheduleName(Choice):
    cosine = 'cosine'
    constant = 'constant'


class Amp(Choice):  # null: float32
    bf16 = 'bf16'
    fp16 = 'fp16'


class ClipMode(Choice):  # timm.utils.dispatch_clip_grad
    norm = 'norm'
    value = 'value'
    agc = 'agc'


@dataclass
class ModelConfig:
    name: str = 'rednet50'                    # timm model name (rednet26 ... rednet152, resnet50, ...)
    # the 32x32 stem (stride-1 first conv, no max-pool); null = automatic: on when data.img_size <= 64 (CIFAR,
    # digits), the ImageNet stem otherwise (timm ResNets: a 3x3 stride-1 stem without max-pool)
    small_input: Optional[bool] = None
    stem_kernel_size: int = 3                 # RedNet stem involution kernel (7 = detection variant)
    # the bottleneck involutions (the paper's ablations; official: 7, 16, 4, 1)
    kernel_size: int = 7                      # kernel (odd)
    group_channels: int = 16                  # channels per group (divides 64: 1, 2, 4, ..., 64)
    reduction_ratio: int = 4                  # kernel generator reduction C -> C / r (divides 64)
    dilation: int = 1                         # tap spacing ("same" padding)
    involution_backend: InvolutionBackend = InvolutionBackend.auto  # rednet.ops backend of every involution
    # span conv fused into the aggregation (CPU); null = where the kernel map outgrows the cache
    fuse_span: Optional[bool] = None
    pretrained: Optional[str] = None          # path of weights to start from (any format rednet.load_model reads)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (+model.kwargs.x=...)


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


def _override_values(override: Any) -> Optional[List[Any]]:
    """The values a parsed override (Hydra's parser) sets: every value of a sweep; None for a sweep without a
    finite list of values, which is left to Hydra."""
    try:
        return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001
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
    except (HydraException, ValueError, TypeError):
        return None  # a syntax Hydra reports itself
    jobs = [(o.key_or_group, _override_values(o)) for o in parsed]
    if any(values is None for _, values in jobs):
        return None
    for key, values in jobs:
        for value in values:
            try:
                check_involution_args(**{key.split('.', 1)[1]: value}, prefix='model.')
            except ValueError as e:
                return str(e)
    return None


@dataclass
class DataConfig:
    name: DataName = DataName.imagenet        # imagenet | imagefolder | cifar10 | cifar100 | digits | synthetic
    root: Optional[str] = None                # data set directory
    train_split: str = 'train'                # sub-folder of root for training (folder data sets)
    val_split: str = 'val'                    # sub-folder of root for validation (folder data sets)
    num_classes: Optional[int] = None         # null = from the data set
    img_size: int = 224                       # training crop / model input size
    crop_pct: float = 0.875                   # eval: resize img_size / crop_pct, centre crop img_size
    interpolation: Interpolation = Interpolation.bilinear  # resize (RandomResizedCrop and eval)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # training augmentation
    train_crop: TrainCrop = TrainCrop.rrc     # rrc (RandomResizedCrop) | pad (random crop with padding) | none
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
    bad_images: BadImages = BadImages.error   # error | skip (skip unreadable images with a warning and a count)
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
    name: ScheduleName = ScheduleName.cosine  # cosine | constant
    per_step: bool = False                    # cosine per iteration instead of per epoch
    warmup_epochs: float = 5.0                # linear warmup, per iteration
    warmup_ratio: float = 0.25                # warmup starts at warmup_ratio * lr
    min_lr: float = 0.0                       # cosine floor


@dataclass
class TrainSection:
    epochs: int = 130
    batch_size: int = 32                      # per process; the paper used 32 x 64 GPUs = 2048
    grad_accum: int = 1                       # micro-batches per optimizer step
    seed: int = 0
    deterministic: bool = False
    resume: Optional[str] = None              # auto (run dir's last checkpoint, if any) | PATH
    device: Optional[str] = None              # null: cuda when available, else cpu
    threads: Optional[int] = None             # CPU threads per process (torch.set_num_threads); null = default
    amp: Optional[Amp] = None                 # null | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    label_smoothing: float = 0.1
    mixup: float = 0.0                        # mixup alpha (0 = off)
    cutmix: float = 0.0                       # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: Optional[float] = None         # max gradient norm (null = no clipping)
    clip_mode: ClipMode = ClipMode.norm       # norm | value | agc
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


def to_plain(cfg: Any) -> Any:
    """``cfg`` resolved, with every :class:`Choice` as its plain string: a struct ``DictConfig`` (a misspelt key
    still fails) that a run uses, writes into checkpoints (which ``torch.load(weights_only=True)`` reads: it
    admits no enums), dumps and compares."""
    from omegaconf import OmegaConf
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(plain, True)
    return plain


_SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'optimizer': OptimizerConfig, 'schedule': ScheduleConfig,
             'train': TrainSection}


def _choices_of(annotation: Any) -> Optional[Type[Choice]]:
    """The :class:`Choice` enum of a field's type (``Amp`` or ``Optional[Amp]``), else None."""
    for tp in (annotation, *typing.get_args(annotation)):
        if isinstance(tp, type) and issubclass(tp, Choice):
            return tp
    return None


def choice_problem(schema: type, name: str, key: str, override: Any) -> Optional[str]:
    """A message naming the valid values when the parsed override ``override`` (Hydra's parser; sweeps
    included) gives the field ``name`` of dataclass ``schema`` a value that is not one of its choices; else None.
    ``key`` is the key as the user wrote it (``data.train_crop``)."""
    annotation = typing.get_type_hints(schema).get(name)
    choices = _choices_of(annotation)
    if choices is None or override.is_delete():
        return None
    values = _override_values(override)
    if values is None:
        return None
    optional = type(None) in typing.get_args(annotation)
    valid = [c.value for c in choices] + (['null'] if optional else [])
    for value in values:
        if value is None and optional or isinstance(value, str) and value in choices.__members__:
            continue
        return f'{key}={value} is not valid; choose one of: {", ".join(valid)}'
    return None


def _groups() -> List[str]:
    """The config groups of ``configs/`` (``model``, ``data``, ...): a ``group=choice`` override picks a file."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / 'configs'
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else list(_SECTIONS)


def _recipe_problem(override: Any) -> Optional[str]:
    """``recipe`` is optional in the defaults (a data set without a recipe file has none), so Hydra would take a
    misspelt ``recipe=NAME`` silently: check that the file exists."""
    from pathlib import Path
    if override.is_delete():
        return None
    root = Path(__file__).resolve().parents[1] / 'configs' / 'recipe'
    known = sorted(p.stem for p in root.glob('*.yaml'))
    for value in _override_values(override) or []:
        if not isinstance(value, str) or value not in known:
            return (f'recipe={value} is not a recipe; available: {", ".join(known)} (configs/recipe/); '
                    f'~recipe trains without the data set\'s recipe')
    return None


def check_overrides(overrides: List[str]) -> Optional[str]:
    """A message naming the valid keys when an override sets a key the schema does not have, or naming the valid
    values when it gives a choice (``data.train_crop``, ``train.amp``, ...) another value; else None.

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
        if key == 'recipe':
            problem = _recipe_problem(override)
            if problem:
                return problem
            continue
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
        problem = choice_problem(_SECTIONS[section], name, key, override) if len(parts) == 2 else None
        if problem:
            return problem
    return None
