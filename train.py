"""Train RedNet (or a timm baseline) with Hydra configs from ``configs/``.

    python train.py                                          # RedNet-50, the paper's ImageNet recipe
    python train.py model=rednet26 data=digits               # CPU demo: >= 95% top-1 in about 2 minutes
    python train.py data=cifar10 model=rednet26              # CIFAR recipe, 32x32 stem
    torchrun --nproc_per_node=8 train.py data.root=/data/imagenet hydra.run.dir=runs/rednet50
    python train.py train.resume=auto hydra.run.dir=runs/rednet50   # continue a stopped run

Phases, top to bottom: check the config, set up processes and the run directory, data, model, optimizer and
schedule, loss, resume, then the epoch loop (train, evaluate, log, checkpoint). The loops themselves live in
``rednet/engine.py``, data sets and transforms in ``rednet/data.py``, the config schema in
``rednet/train_config.py``.
"""
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import hydra
import timm
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from timm.utils import random_seed  # by name: cloudpickle (submitit) chokes on `timm.utils.` beside `.deterministic`

import rednet  # noqa: F401  (registers the RedNet models with timm)
from rednet import data as rdata
from rednet import engine
from rednet.checkpoint import is_rednet
from rednet.engine import log
from rednet.ops import INDUCTOR_OPTIONS
from rednet.train_config import (INVOLUTION_KEYS, check_involution_config, check_involution_overrides,
                                 check_overrides, register_schema, to_plain)

register_schema()


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any work is done."""


# ---------------------------------------------------------------------------------------------------------
# 1. config checks

def validate_config(cfg: DictConfig) -> None:
    """Values the schema's types and choices (rednet/train_config.py, checked at composition) cannot check: the
    model name, the involution settings and ranges. Fails before any work."""
    import timm
    if not timm.is_model(cfg.model.name):
        raise ConfigError(f'model.name={cfg.model.name!r} is not a timm model; RedNet models: '
                          f'{", ".join(timm.list_models("rednet*"))} (or any timm model, e.g. resnet50)')
    problem = check_involution_config(cfg.model)
    if problem:
        raise ConfigError(problem)
    for key in ('train.epochs', 'train.batch_size', 'train.grad_accum', 'train.eval_every', 'data.img_size'):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f'{key} must be >= 1, got {OmegaConf.select(cfg, key)}')
    if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError(f'train.mixup/train.cutmix pair the images of a batch and need an even '
                          f'train.batch_size, got {cfg.train.batch_size}')
    if cfg.train.resume not in (None, 'auto') and not Path(cfg.train.resume).is_file():
        raise ConfigError(f'train.resume={cfg.train.resume}: no such file (use train.resume=auto to continue from '
                          f'the run directory\'s checkpoints/last.pt)')
    if cfg.data.name in ('imagenet', 'imagefolder'):  # cheap: stops at the first image of each split
        for split in (cfg.data.train_split, cfg.data.val_split):
            rdata._check_split(cfg.data.root, split, cfg.data.name)
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f'model.pretrained={cfg.model.pretrained}: no such file')


# ---------------------------------------------------------------------------------------------------------
# 2. processes, devices, run directory

def setup(cfg: DictConfig, run_dir: Optional[str] = None) -> Tuple[engine.DistInfo, Path]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = engine.setup_distributed(cfg.train.device, cfg.train.dist_backend)
    if cfg.train.amp == 'fp16' and info.device.type != 'cuda':
        raise ConfigError('train.amp=fp16 needs CUDA; on CPU use train.amp=bf16 or null')
    # all processes use rank 0's run directory (hydra.run.dir may contain ${now:...})
    run_dir = Path(engine.broadcast_object(run_dir or HydraConfig.get().runtime.output_dir))
    engine.set_deterministic(cfg.train.deterministic)
    random_seed(cfg.train.seed, info.rank)
    return info, run_dir


# ---------------------------------------------------------------------------------------------------------
# 3. data

def build_data(cfg: DictConfig, info: engine.DistInfo):
    train_set = rdata.build_dataset(cfg.data, train=True, seed=cfg.train.seed)
    val_set = rdata.build_dataset(cfg.data, train=False, seed=cfg.train.seed,
                                  class_to_idx=getattr(train_set, 'class_to_idx', None))
    num_classes = cfg.data.num_classes or len(train_set.classes)
    pin = cfg.data.pin_memory and info.device.type == 'cuda'
    mixing = cfg.train.mixup > 0 or cfg.train.cutmix > 0  # timm's Mixup needs even batches: no short last one
    train_loader = rdata.build_loader(train_set, cfg.train.batch_size, True, cfg.data.workers, cfg.train.seed,
                                      info.rank, info.world_size, pin, drop_last=True if mixing else None)
    val_loader = rdata.build_loader(val_set, cfg.train.batch_size, False, cfg.data.workers, cfg.train.seed,
                                    info.rank, info.world_size, pin)
    if len(train_loader) < cfg.train.grad_accum:
        raise ConfigError(f'{len(train_set)} training images make {len(train_loader)} batches of '
                          f'{cfg.train.batch_size} per process, fewer than train.grad_accum={cfg.train.grad_accum}')
    log(f'data: {cfg.data.name} ({num_classes} classes), {len(train_set)} train / {len(val_set)} val images, '
        f'{cfg.data.img_size}px')
    return train_loader, val_loader, num_classes


# ---------------------------------------------------------------------------------------------------------
# 4. model

def build_model(cfg: DictConfig, num_classes: int, info: engine.DistInfo):
    """The bare model, its DDP/compile wrapper, and the (arch, model_args) that ``rednet.load_model`` needs."""
    import timm
    from rednet.model import timm_small_input_stem
    small = cfg.model.small_input
    if small is None:
        small = cfg.data.img_size <= 64
    model_args: Dict[str, Any] = dict(num_classes=num_classes, in_chans=3, **cfg.model.kwargs)
    if is_rednet(cfg.model.name):
        model_args.update(small_input=bool(small), stem_kernel_size=cfg.model.stem_kernel_size,
                          **{k: cfg.model[k] for k in INVOLUTION_KEYS})
        model = timm.create_model(cfg.model.name, involution_backend=cfg.model.involution_backend,
                                  fuse_span=cfg.model.fuse_span, **model_args)
    else:
        model = timm.create_model(cfg.model.name, **model_args)
        if small:  # CIFAR stem for timm ResNets: 3x3 stride-1 conv, no max-pool
            try:
                timm_small_input_stem(model)
            except ValueError as e:
                raise ConfigError(f'model.small_input: {e}; set model.small_input=false') from None
        model_args['small_input'] = bool(small)  # rednet.load_model rebuilds the stem from it
    if cfg.model.pretrained:
        from rednet.checkpoint import load_weights
        load_weights(model, cfg.model.pretrained)
    if cfg.train.sync_bn and info.distributed:
        if info.device.type == 'cpu':
            raise ConfigError('train.sync_bn=true needs GPUs (PyTorch\'s SyncBatchNorm has no CPU implementation)')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = model
    if cfg.train.compile:  # inductor options that keep compiled float32 training as accurate as eager (CPU)
        wrapped = torch.compile(wrapped, options=INDUCTOR_OPTIONS.get(info.device.type))
    if info.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[info.device] if info.device.type == 'cuda' else None)
    params = sum(p.numel() for p in model.parameters())
    log(f'model: {cfg.model.name} ({params / 1e6:.2f}M parameters, small_input={bool(small)}) on {info.device}'
        f'{f" x {info.world_size} processes" if info.distributed else ""}')
    return model, wrapped, cfg.model.name, model_args


# ---------------------------------------------------------------------------------------------------------
# 5. optimizer, schedule, loss

def build_optimizer(cfg: DictConfig, model: nn.Module, global_batch: int) -> Tuple[torch.optim.Optimizer, float]:
    """timm optimizer; lr = optimizer.lr x global batch / optimizer.lr_base_batch (linear scaling rule)."""
    from timm.optim import create_optimizer_v2
    o = cfg.optimizer
    lr = o.lr * global_batch / o.lr_base_batch if o.lr_base_batch else o.lr
    name = o.name
    if name == 'sgd' and not o.nesterov:
        name = 'momentum'  # timm: 'sgd' is Nesterov SGD, 'momentum' plain momentum SGD
    kwargs: Dict[str, Any] = {}
    if name in ('sgd', 'momentum'):
        kwargs['momentum'] = o.momentum
    if o.betas is not None:
        kwargs['betas'] = tuple(o.betas)
    if o.eps is not None:
        kwargs['eps'] = o.eps
    optimizer = create_optimizer_v2(model, opt=name, lr=lr, weight_decay=o.weight_decay,
                                    filter_bias_and_bn=o.no_wd_norm_bias, **kwargs)
    return optimizer, lr


def build_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, step: int = 0):
    """The schedule of the current config, positioned at optimizer step ``step`` (0: a fresh run; on resume the
    position :func:`resume_position` computed, so the lr is the one a fresh run of this config has there)."""
    s = cfg.schedule
    lr = optimizer.param_groups[0].get('initial_lr', optimizer.param_groups[0]['lr'])
    fn = engine.WarmupCosine(cfg.train.epochs, steps_per_epoch, round(s.warmup_epochs * steps_per_epoch),
                             s.warmup_ratio, s.min_lr / lr if lr > 0 else 0.0, s.per_step, str(s.name))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=step - 1)


def build_loss(cfg: DictConfig, num_classes: int):
    """Training criterion and the optional timm Mixup/CutMix (which then makes soft targets)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                      switch_prob=t.mixup_switch_prob, label_smoothing=t.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


# ---------------------------------------------------------------------------------------------------------
# 6. checkpoints and resume

def params_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters' bytes: data-parallel processes must hold identical weights."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().flatten().view(torch.uint8).numpy())  # logical order, any memory layout
    return h.hexdigest()


def save_checkpoint(path: Path, state: Dict[str, Any], info: engine.DistInfo, model: nn.Module) -> None:
    """Gather every process's RNG state and weights digest, then rank 0 writes ``path`` atomically (with a
    warning if the processes' weights differ, which DDP's gradient averaging should make impossible)."""
    mine = (engine.capture_rng_state(), params_digest(model))
    if info.distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    rngs, digests = [g[0] for g in gathered], [g[1] for g in gathered]
    if len(set(digests)) > 1:
        warnings.warn(f'the {info.world_size} processes hold different weights (parameter digests '
                      f'{", ".join(d[:12] for d in digests)}); gradients were not averaged across them')
    if info.is_main:
        engine.atomic_save({**state, 'rng': rngs, 'params_digests': digests}, str(path))


def checkpoint_state(model, arch, model_args, optimizer, scheduler, scaler, ema, cfg, epoch: int,
                     epoch_complete: bool, batches_done: int, step: int, best_top1: float,
                     metrics: Optional[Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    return {
        'model': model.state_dict(), 'arch': arch, 'model_args': dict(model_args),
        'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'ema': ema.module.state_dict() if ema is not None else None,
        'epoch': epoch, 'epoch_complete': epoch_complete, 'batches_done': batches_done, 'step': step,
        'best_top1': best_top1, 'metrics': metrics, 'world_size': world_size,
        'config': OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),  # plain: weights_only loads it
        'config_yaml': OmegaConf.to_yaml(cfg, resolve=True),
        'format_version': 1,
    }


def find_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    if cfg.train.resume == 'auto':
        last = run_dir / 'checkpoints' / 'last.pt'
        if last.is_file():
            return last
        log(f'train.resume=auto: no {last} yet, starting from scratch')
        return None
    return Path(cfg.train.resume) if cfg.train.resume else None


def run_layout(cfg: DictConfig, steps_per_epoch: int, world_size: int) -> Dict[str, Any]:
    """What fixes the step count and the lr of a run: saved in checkpoints, compared on resume."""
    return dict(epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, batch_size=cfg.train.batch_size,
                grad_accum=cfg.train.grad_accum, processes=world_size)


def _saved_layout(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    if ckpt.get('layout'):
        return ckpt['layout']
    t, fn = ckpt['config']['train'], ckpt['scheduler']['lr_lambdas'][0]  # checkpoints before 'layout'
    return dict(epochs=t['epochs'], steps_per_epoch=fn['iters_per_epoch'], batch_size=t['batch_size'],
                grad_accum=t['grad_accum'], processes=ckpt.get('world_size', 1))


def _config_changes(ckpt: Dict[str, Any], cfg: DictConfig, layout: Dict[str, Any]) -> List[str]:
    """``key old -> new`` for every setting of the run's layout, optimizer and schedule that differs."""
    old = _saved_layout(ckpt)
    names = dict(epochs='train.epochs', batch_size='train.batch_size', grad_accum='train.grad_accum',
                 processes='processes')
    changes = [f'{name} {old[k]} -> {layout[k]}' for k, name in names.items() if old[k] != layout[k]]
    for section in ('optimizer', 'schedule'):
        saved = ckpt['config'].get(section, {})
        now = OmegaConf.to_container(cfg[section], resolve=True, enum_to_str=True)
        changes += [f'{section}.{k} {saved.get(k)} -> {v}' for k, v in now.items() if saved.get(k) != v]
    return changes


def resume_position(ckpt: Dict[str, Any], layout: Dict[str, Any]) -> Dict[str, int]:
    """Where to continue in the current config: (epoch, micro-batches done in it, optimizer step).

    The same layout continues exactly where the checkpoint stopped. A changed one (epochs, batch size, processes,
    accumulation) continues at the same point counted in epochs done plus the fraction of the current one,
    at the optimizer step a fresh run of the current config has there.
    """
    old = _saved_layout(ckpt)
    complete = ckpt.get('epoch_complete', True)
    epoch = ckpt['epoch'] + 1 if complete else ckpt['epoch']
    batches_done = 0 if complete else ckpt['batches_done']
    if all(old[k] == layout[k] for k in ('steps_per_epoch', 'batch_size', 'grad_accum', 'processes')):
        return dict(epoch=epoch, batches_done=batches_done, step=ckpt['step'])
    steps_in_epoch = (batches_done // old['grad_accum']) * layout['steps_per_epoch'] // old['steps_per_epoch']
    return dict(epoch=epoch, batches_done=steps_in_epoch * layout['grad_accum'],
                step=epoch * layout['steps_per_epoch'] + steps_in_epoch)


def load_resume(path: Path, cfg: DictConfig, model, optimizer, scaler, ema, info: engine.DistInfo,
                layout: Dict[str, Any]) -> Dict[str, Any]:
    """Restore training state from ``path``; returns where to continue (epoch, batches_done, step, best, rng).

    The optimizer's state (momenta) comes from the checkpoint, its hyperparameters (lr by the linear scaling
    rule for the current global batch, weight decay, ...) from the current config; the schedule is rebuilt
    from the current config by the caller (:func:`build_schedule` at the returned step).
    """
    from rednet.checkpoint import load_state_dict_strict
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    load_state_dict_strict(model, ckpt['model'], str(path))
    fresh = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt['optimizer'])
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper, initial_lr=hyper['lr'])
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if ema is not None:
        if ckpt.get('ema') is not None:
            ema.module.load_state_dict(ckpt['ema'])
        else:
            ema.module.load_state_dict(model.state_dict())
    rngs = ckpt.get('rng') or []
    rng = rngs[info.rank] if len(rngs) == info.world_size else (rngs[0] if rngs else None)
    if rngs and len(rngs) != info.world_size:
        warnings.warn(f'{path} was written by {len(rngs)} processes, this run has {info.world_size}: '
                      f'random states are not restored exactly')
        rng = None
    where = resume_position(ckpt, layout)
    complete = ckpt.get('epoch_complete', True)
    log(f'resumed from {path}: epoch {ckpt["epoch"]} {"done" if complete else "interrupted"}, step {ckpt["step"]}')
    changes = _config_changes(ckpt, cfg, layout)
    if changes:
        log(f'resume with a changed config: {", ".join(changes)}; schedule rebuilt from the current config, '
            f'continuing at epoch {where["epoch"]} + {where["batches_done"] // layout["grad_accum"]}/'
            f'{layout["steps_per_epoch"]} steps = optimizer step {where["step"]} of '
            f'{layout["epochs"] * layout["steps_per_epoch"]}')
    return dict(where, best_top1=ckpt.get('best_top1', 0.0), rng=rng)


# ---------------------------------------------------------------------------------------------------------
# 7. logging

def _epoch_rows(metrics_path: Path) -> list:
    """The lines of ``metrics.jsonl`` with their epochs; a truncated or garbled line (a kill while appending) is
    dropped with a warning."""
    rows = []
    for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line)['epoch'], line))
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f'{metrics_path}: dropping unreadable line {n} ({type(e).__name__}: {line[:60]!r})')
    return rows


def open_logs(run_dir: Path, start_epoch: int, step: int, info: engine.DistInfo):
    """TensorBoard writer and metrics.jsonl (entries of epochs about to be redone are dropped; rewritten
    atomically)."""
    if not info.is_main:
        return None, None
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / 'tb'), purge_step=step if step else None)
    metrics_path = run_dir / 'metrics.jsonl'
    if metrics_path.exists():
        kept = ''.join(line + '\n' for epoch, line in _epoch_rows(metrics_path) if epoch < start_epoch)
        engine.atomic_write(str(metrics_path), lambda tmp: Path(tmp).write_text(kept))
    metrics_path.touch()
    return writer, metrics_path


def log_epoch(writer, metrics_path: Optional[Path], m: Dict[str, Any]) -> None:
    if metrics_path is None:
        return
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(m) + '\n')
    e = m['epoch']
    for key, tag in (('train_loss', 'train/loss'), ('lr', 'train/lr'), ('img_per_sec', 'train/img_per_sec'),
                     ('epoch_time', 'train/epoch_time'), ('val_loss', 'val/loss'), ('val_top1', 'val/top1'),
                     ('val_top5', 'val/top5'), ('val_img_per_sec', 'val/img_per_sec'),
                     ('val_top1_ema', 'val/top1_ema')):
        if m.get(key) is not None:
            writer.add_scalar(tag, m[key], e)
    writer.flush()
    val = (f'val_loss {m["val_loss"]:.4f}  top1 {m["val_top1"]:.2f}%  top5 {m["val_top5"]:.2f}%  '
           if m.get('val_top1') is not None else '')
    log(f'epoch {e}: train_loss {m["train_loss"]:.4f}  {val}lr {m["lr"]:.4g}  {m["img_per_sec"]:.1f} img/s  '
        f'{m["epoch_time"]:.1f}s')


# ---------------------------------------------------------------------------------------------------------
# 8. the run

def train(cfg: DictConfig, run_dir: Optional[str] = None) -> Dict[str, Any]:
    """The whole run; ``run_dir`` defaults to Hydra's run directory (``hydra.run.dir``). Everything logged also
    goes to ``train.log`` there; the resolved config is written to ``config.yaml``. The run sees the config with
    plain strings for the schema's choices (:func:`rednet.train_config.to_plain`)."""
    cfg = to_plain(cfg)
    validate_config(cfg)
    info, run_dir = setup(cfg, run_dir)
    with engine.log_to_file(str(run_dir / 'train.log') if info.is_main else None):
        if info.is_main:
            engine.atomic_write(str(run_dir / 'config.yaml'),
                                lambda tmp: Path(tmp).write_text(OmegaConf.to_yaml(cfg, resolve=True)))
            log(f'config: {run_dir / "config.yaml"}; log: {run_dir / "train.log"}; '
                f'TensorBoard: tensorboard --logdir {run_dir / "tb"}')
        return fit(cfg, info, run_dir)


def fit(cfg: DictConfig, info: engine.DistInfo, run_dir: Path) -> Dict[str, Any]:
    """Data, model, optimizer, resume, then the epoch loop (train, evaluate, log, checkpoint)."""
    ckpt_dir = run_dir / 'checkpoints'
    train_loader, val_loader, num_classes = build_data(cfg, info)
    model, wrapped, arch, model_args = build_model(cfg, num_classes, info)

    global_batch = cfg.train.batch_size * info.world_size * cfg.train.grad_accum
    steps_per_epoch = len(train_loader) // cfg.train.grad_accum
    optimizer, lr = build_optimizer(cfg, model, global_batch)
    layout = run_layout(cfg, steps_per_epoch, info.world_size)
    criterion, mixup_fn = build_loss(cfg, num_classes)
    scaler = torch.amp.GradScaler(info.device.type) if cfg.train.amp == 'fp16' else None
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    log(f'optimizer: {cfg.optimizer.name}, lr {lr:.4g} for global batch {global_batch} '
        f'({cfg.train.batch_size} x {info.world_size} processes x {cfg.train.grad_accum} accumulation), '
        f'{steps_per_epoch} steps/epoch, {cfg.train.epochs} epochs; run dir {run_dir}')

    start_epoch, batches_done, step, best_top1, rng = 0, 0, 0, 0.0, None
    resume_path = find_resume(cfg, run_dir)
    if resume_path is not None:
        where = load_resume(resume_path, cfg, model, optimizer, scaler, ema, info, layout)
        start_epoch, batches_done, step = where['epoch'], where['batches_done'], where['step']
        best_top1, rng = where['best_top1'], where['rng']
    scheduler = build_schedule(cfg, optimizer, steps_per_epoch, step)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, ckpt_dir):
            for name in engine.remove_stale_temp_files(str(folder)):
                log(f'removed {folder / name}, left by a save that was killed')
    writer, metrics_path = open_logs(run_dir, start_epoch, step, info)
    steplog = engine.StepLog(cfg.train.log_every, cfg.train.epochs, writer,
                             bar=cfg.train.progress and info.is_main and sys.stderr.isatty())
    stop = engine.StopFlag().install()
    setup = engine.TrainSetup(
        device=info.device, grad_accum=cfg.train.grad_accum, steps_per_epoch=steps_per_epoch, amp=cfg.train.amp,
        scaler=scaler, clip_grad=cfg.train.clip_grad, clip_mode=cfg.train.clip_mode, mixup_fn=mixup_fn, ema=ema,
        channels_last=cfg.train.channels_last, skip_nonfinite=cfg.train.skip_nonfinite, stop=stop, steplog=steplog)
    progress = engine.Progress(global_step=step, batches_done=batches_done,
                               last_checkpoint=str(resume_path) if resume_path is not None else None)
    last_path = ckpt_dir / 'last.pt'
    if rng is not None:
        engine.restore_rng_state(rng)  # last: nothing above may consume random numbers after this

    def state(epoch, complete, done, metrics=None):
        return dict(checkpoint_state(model, arch, model_args, optimizer, scheduler, scaler, ema, cfg, epoch,
                                     complete, done, progress.global_step, best_top1, metrics, info.world_size),
                    layout=layout)

    metrics: Dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.sampler.set_epoch(epoch, skip=progress.batches_done * cfg.train.batch_size)
            stats = engine.train_one_epoch(wrapped, train_loader, optimizer, scheduler, criterion, epoch, setup,
                                           progress)
            engine.broadcast_buffers(model)  # validate and save the same BatchNorm statistics on every rank
            if ema is not None:
                engine.broadcast_buffers(ema.module)
            if stats['interrupted']:
                save_checkpoint(last_path, state(epoch, False, progress.batches_done), info, model)
                log(f'SIGTERM: stopped at epoch {epoch}, step {progress.global_step}; saved {last_path}. Continue '
                    f'with the same command plus train.resume=auto hydra.run.dir={run_dir}')
                stop.pass_on()
                return {'interrupted': True, 'run_dir': str(run_dir), **metrics}
            progress.batches_done = 0

            last_epoch = epoch + 1 == cfg.train.epochs
            val = ema_val = None
            if (epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
                val = engine.evaluate(wrapped, val_loader, info.device, cfg.train.amp, cfg.train.channels_last)
                if ema is not None:
                    ema_val = engine.evaluate(ema.module, val_loader, info.device, cfg.train.amp,
                                              cfg.train.channels_last)
            is_best = val is not None and (val['top1'] > best_top1 or not (ckpt_dir / 'best.pt').exists())
            if is_best:
                best_top1 = val['top1']
            metrics = dict(
                epoch=epoch, step=progress.global_step, train_loss=stats['loss'],
                val_loss=val['loss'] if val else None, val_top1=val['top1'] if val else None,
                val_top5=val['top5'] if val else None, lr=stats['lr'], img_per_sec=stats['img_per_sec'],
                epoch_time=stats['time'], val_img_per_sec=val['img_per_sec'] if val else None,
                val_images=val['images'] if val else None, best_top1=best_top1,
                skipped_steps=stats['skipped_steps'], val_top1_ema=ema_val['top1'] if ema_val else None,
                val_loss_ema=ema_val['loss'] if ema_val else None,
                skipped_images=stats['skipped_images'], val_skipped_images=val['skipped_images'] if val else None)
            log_epoch(writer, metrics_path, metrics)
            save_checkpoint(last_path, state(epoch, True, 0, metrics), info, model)
            progress.last_checkpoint = str(last_path)
            if is_best and cfg.train.save_best and info.is_main:
                engine.atomic_link_or_copy(str(last_path), str(ckpt_dir / 'best.pt'))
            if engine.reduce_sum([float(stop.requested)], info.device)[0] > 0 and not last_epoch:
                log(f'SIGTERM: stopped after epoch {epoch}; saved {last_path}. Continue with the same command plus '
                    f'train.resume=auto hydra.run.dir={run_dir}')
                stop.pass_on()
                return {'interrupted': True, 'run_dir': str(run_dir), **metrics}
    finally:
        stop.uninstall()
        if writer is not None:
            writer.close()
    log(f'done: best val top-1 {best_top1:.2f}%; checkpoints in {ckpt_dir}')
    return {'interrupted': False, 'run_dir': str(run_dir), **metrics}


@hydra.main(config_path='configs', config_name='train', version_base=None)
def main(cfg: DictConfig) -> None:
    logging.captureWarnings(True)  # warnings go to the log (console and train.log) like everything else
    engine.run_cli(train, cfg, {ConfigError: 2, rdata.DataError: 2, engine.NonFiniteLossError: 3})


if __name__ == '__main__':
    engine.check_cli(check_overrides)
    engine.check_cli(check_involution_overrides)  # every value of a -m sweep, before the first job
    main()
