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
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import hydra
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rednet  # noqa: F401  (registers the RedNet models with timm)
from rednet import data as rdata
from rednet import engine
from rednet.engine import log
from rednet.train_config import check_overrides, register_schema

register_schema()


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any work is done."""


# ---------------------------------------------------------------------------------------------------------
# 1. config checks

def is_rednet(name: str) -> bool:
    return name.startswith('rednet')


def validate_config(cfg: DictConfig) -> None:
    """Values the schema's types cannot check: names, choices and ranges. Fails before any work."""
    import timm
    from rednet.ops import BACKENDS

    def choose(value, choices, key):
        if value not in choices:
            raise ConfigError(f'{key}={value!r} is not valid; choose one of: {", ".join(map(str, choices))}')

    if not timm.is_model(cfg.model.name):
        raise ConfigError(f'model.name={cfg.model.name!r} is not a timm model; RedNet models: '
                          f'{", ".join(timm.list_models("rednet*"))} (or any timm model, e.g. resnet50)')
    if is_rednet(cfg.model.name):
        choose(cfg.model.involution_backend, BACKENDS, 'model.involution_backend')
    choose(cfg.data.name, rdata.DATASETS, 'data.name')
    choose(cfg.data.bad_images, ('error', 'skip'), 'data.bad_images')
    choose(cfg.data.train_crop, ('rrc', 'pad', 'none'), 'data.train_crop')
    choose(cfg.schedule.name, ('cosine', 'constant'), 'schedule.name')
    choose(cfg.train.amp, (None, 'bf16', 'fp16'), 'train.amp')
    choose(cfg.train.clip_mode, ('norm', 'value', 'agc'), 'train.clip_mode')
    for key in ('train.epochs', 'train.batch_size', 'train.grad_accum', 'train.eval_every', 'data.img_size'):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f'{key} must be >= 1, got {OmegaConf.select(cfg, key)}')
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
    engine.seed_everything(cfg.train.seed + info.rank)
    return info, run_dir


# ---------------------------------------------------------------------------------------------------------
# 3. data

def build_data(cfg: DictConfig, info: engine.DistInfo):
    train_set = rdata.build_dataset(cfg.data, train=True, seed=cfg.train.seed)
    val_set = rdata.build_dataset(cfg.data, train=False, seed=cfg.train.seed,
                                  class_to_idx=getattr(train_set, 'class_to_idx', None))
    num_classes = cfg.data.num_classes or len(train_set.classes)
    pin = cfg.data.pin_memory and info.device.type == 'cuda'
    train_loader = rdata.build_loader(train_set, cfg.train.batch_size, True, cfg.data.workers, cfg.train.seed,
                                      info.rank, info.world_size, pin)
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
    small = cfg.model.small_input
    if small is None:
        small = cfg.data.img_size <= 64
    model_args: Dict[str, Any] = dict(num_classes=num_classes, in_chans=3, **cfg.model.kwargs)
    if is_rednet(cfg.model.name):
        model_args.update(small_input=bool(small), stem_kernel_size=cfg.model.stem_kernel_size)
        model = timm.create_model(cfg.model.name, involution_backend=cfg.model.involution_backend,
                                  fuse_span=cfg.model.fuse_span, **model_args)
    else:
        model = timm.create_model(cfg.model.name, **model_args)
        if small:  # CIFAR stem for timm ResNets: 3x3 stride-1 conv, no max-pool
            if not (hasattr(model, 'conv1') and hasattr(model, 'maxpool')):
                raise ConfigError(f'model.small_input is only implemented for RedNet and timm ResNets, '
                                  f'not {cfg.model.name}; set model.small_input=false')
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        model_args['small_input'] = bool(small)  # informative; timm's own models do not take it
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
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
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


def build_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    s = cfg.schedule
    lr = optimizer.param_groups[0]['lr']
    fn = engine.WarmupCosine(cfg.train.epochs, steps_per_epoch, round(s.warmup_epochs * steps_per_epoch),
                             s.warmup_ratio, s.min_lr / lr if lr > 0 else 0.0, s.per_step, s.name)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_loss(cfg: DictConfig, num_classes: int):
    """Training criterion and the optional timm Mixup/CutMix (which then makes soft targets)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                      switch_prob=t.mixup_switch_prob, label_smoothing=t.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if t.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(t.label_smoothing), None
    return nn.CrossEntropyLoss(), None


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
        'config': OmegaConf.to_container(cfg, resolve=True), 'config_yaml': OmegaConf.to_yaml(cfg, resolve=True),
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


def load_resume(path: Path, model, optimizer, scheduler, scaler, ema, info: engine.DistInfo) -> Dict[str, Any]:
    """Restore training state from ``path``; returns where to continue (epoch, batches_done, step, best, rng)."""
    from rednet.checkpoint import load_state_dict_strict
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    load_state_dict_strict(model, ckpt['model'], str(path))
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
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
    complete = ckpt.get('epoch_complete', True)
    where = dict(epoch=ckpt['epoch'] + 1 if complete else ckpt['epoch'],
                 batches_done=0 if complete else ckpt['batches_done'],
                 step=ckpt['step'], best_top1=ckpt.get('best_top1', 0.0), rng=rng)
    log(f'resumed from {path}: epoch {ckpt["epoch"]} {"done" if complete else "interrupted"}, step {ckpt["step"]}')
    return where


# ---------------------------------------------------------------------------------------------------------
# 7. logging

def open_logs(run_dir: Path, start_epoch: int, step: int, info: engine.DistInfo):
    """TensorBoard writer and metrics.jsonl (entries of epochs about to be redone are dropped)."""
    if not info.is_main:
        return None, None
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / 'tb'), purge_step=step if step else None)
    metrics_path = run_dir / 'metrics.jsonl'
    if metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)['epoch'] < start_epoch]
        metrics_path.write_text(''.join(line + '\n' for line in kept))
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
    """The whole run; ``run_dir`` defaults to Hydra's run directory (``hydra.run.dir``)."""
    validate_config(cfg)
    info, run_dir = setup(cfg, run_dir)
    ckpt_dir = run_dir / 'checkpoints'
    train_loader, val_loader, num_classes = build_data(cfg, info)
    model, wrapped, arch, model_args = build_model(cfg, num_classes, info)

    global_batch = cfg.train.batch_size * info.world_size * cfg.train.grad_accum
    steps_per_epoch = len(train_loader) // cfg.train.grad_accum
    optimizer, lr = build_optimizer(cfg, model, global_batch)
    scheduler = build_schedule(cfg, optimizer, steps_per_epoch)
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
        where = load_resume(resume_path, model, optimizer, scheduler, scaler, ema, info)
        start_epoch, batches_done, step = where['epoch'], where['batches_done'], where['step']
        best_top1, rng = where['best_top1'], where['rng']
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    writer, metrics_path = open_logs(run_dir, start_epoch, step, info)
    stop = engine.StopFlag().install()
    last_path = ckpt_dir / 'last.pt'
    last_good = str(resume_path) if resume_path is not None else None
    if rng is not None:
        engine.restore_rng_state(rng)  # last: nothing above may consume random numbers after this

    def state(epoch, complete, done, metrics=None):
        return checkpoint_state(model, arch, model_args, optimizer, scheduler, scaler, ema, cfg, epoch, complete,
                                done, step, best_top1, metrics, info.world_size)

    metrics: Dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.sampler.set_epoch(epoch, skip=batches_done * cfg.train.batch_size)
            train_loader.generator.manual_seed(cfg.train.seed * 1_000_003 + epoch * 1009 + info.rank)
            stats = engine.train_one_epoch(
                wrapped, train_loader, optimizer, scheduler, criterion, info.device, epoch,
                global_step=step, batches_done=batches_done, steps_per_epoch=steps_per_epoch, amp=cfg.train.amp,
                scaler=scaler, grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad,
                clip_mode=cfg.train.clip_mode, mixup_fn=mixup_fn, ema=ema, channels_last=cfg.train.channels_last,
                skip_nonfinite=cfg.train.skip_nonfinite, stop=stop, last_checkpoint=last_good, writer=writer,
                log_every=cfg.train.log_every, progress=cfg.train.progress and info.is_main)
            step = stats['global_step']
            if stats['interrupted']:
                save_checkpoint(last_path, state(epoch, False, stats['batches_done']), info, model)
                log(f'SIGTERM: stopped at epoch {epoch}, step {step}; saved {last_path}. Continue with the same '
                    f'command plus train.resume=auto hydra.run.dir={run_dir}')
                return {'interrupted': True, 'run_dir': str(run_dir), **metrics}
            batches_done = 0

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
                epoch=epoch, step=step, train_loss=stats['loss'],
                val_loss=val['loss'] if val else None, val_top1=val['top1'] if val else None,
                val_top5=val['top5'] if val else None, lr=stats['lr'], img_per_sec=stats['img_per_sec'],
                epoch_time=stats['time'], val_img_per_sec=val['img_per_sec'] if val else None,
                val_images=val['images'] if val else None, best_top1=best_top1,
                skipped_steps=stats['skipped_steps'], val_top1_ema=ema_val['top1'] if ema_val else None)
            log_epoch(writer, metrics_path, metrics)
            save_checkpoint(last_path, state(epoch, True, 0, metrics), info, model)
            last_good = str(last_path)
            if is_best and cfg.train.save_best and info.is_main:
                engine.atomic_link_or_copy(str(last_path), str(ckpt_dir / 'best.pt'))
            if engine.reduce_sum([float(stop.requested)], info.device)[0] > 0 and not last_epoch:
                log(f'SIGTERM: stopped after epoch {epoch}; saved {last_path}. Continue with the same command plus '
                    f'train.resume=auto hydra.run.dir={run_dir}')
                return {'interrupted': True, 'run_dir': str(run_dir), **metrics}
    finally:
        stop.uninstall()
        if writer is not None:
            writer.close()
    log(f'done: best val top-1 {best_top1:.2f}%; checkpoints in {ckpt_dir}')
    return {'interrupted': False, 'run_dir': str(run_dir), **metrics}


@hydra.main(config_path='configs', config_name='train', version_base=None)
def main(cfg: DictConfig) -> None:
    engine.run_cli(train, cfg, {ConfigError: 2, rdata.DataError: 2, engine.NonFiniteLossError: 3})


if __name__ == '__main__':
    engine.check_cli(check_overrides)
    main()
