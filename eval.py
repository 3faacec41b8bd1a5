"""Evaluate a RedNet checkpoint of any kind (or a timm baseline that ``train.py`` trained) on a data set: top-1, top-5, loss, images, img/s.

    python eval.py checkpoint=rednet50.pth data=imagenet data.root=/data/imagenet
    python eval.py checkpoint=RedNet26_pretrained.pdparams data.root=/data/imagenet amp=bf16 channels_last=true
    python eval.py checkpoint=outputs/digits-rednet26/.../checkpoints/best.pt data=digits
    torchrun --nproc_per_node=8 eval.py checkpoint=... data.root=...

The model is built from the file alone (``rednet.load_model``) and evaluated with its own eval transform.
Prints a one-line summary and writes ``eval.json`` in the run directory (``hydra.run.dir``).
"""
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from timm.data import resolve_model_data_config
from torch.utils.data import Dataset

import rednet
from rednet import data as rdata
from rednet import engine
from rednet.engine import log
from rednet.checkpoint import CheckpointError, is_rednet, model_from_checkpoint, read_checkpoint
from rednet.train_config import Amp, Choice, DataConfig, InvolutionBackend, check_overrides, choice_problem, to_plain


class EvalTransform(Choice):
    model = 'model'  # the checkpoint's own eval pipeline (input size, crop_pct, interpolation, mean/std)
    data = 'data'    # the data config's values


@dataclass
class EvalConfig:
    """The schema of ``configs/eval.yaml``: it holds the defaults, which the YAML only documents."""
    checkpoint: str = MISSING                 # required: path of the checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64                      # per process
    device: Optional[str] = None              # null: cuda when available, else cpu
    amp: Optional[Amp] = None                 # null | bf16 | fp16
    channels_last: bool = False
    transform: EvalTransform = EvalTransform.model  # model | data
    class_map: Optional[str] = None           # JSON {data set class name or index: model class index}
    involution_backend: InvolutionBackend = InvolutionBackend.auto  # RedNet checkpoints: rednet.ops backend
    progress: bool = True                     # tqdm progress bar (rank 0, only on a terminal)


ConfigStore.instance().store(name='eval_schema', node=EvalConfig)
EVAL_KEYS = [f.name for f in fields(EvalConfig)]


class EvalError(ValueError):
    """A checkpoint and data set that cannot be evaluated together, or a bad setting."""


def check_eval_overrides(overrides) -> Optional[str]:
    if not any(item.startswith('checkpoint=') for item in overrides) and \
            not any(item.startswith(('-h', '--help', '--cfg', '--info')) for item in overrides):
        return 'give the checkpoint to evaluate: python eval.py checkpoint=PATH data=<name> [data.root=PATH]'
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    for item in overrides:
        key = item.split('=', 1)[0].lstrip('+~')
        if '=' not in item or key.startswith('hydra.') or key.startswith('data.'):
            continue
        if key not in EVAL_KEYS:
            return f'unknown eval key {key!r}; valid keys: {", ".join(EVAL_KEYS)}, data.* and hydra.*'
        try:
            override = OverridesParser.create().parse_overrides([item])[0]
        except OverrideParseException as e:
            return f'cannot parse the override: {e}'
        problem = choice_problem(EvalConfig, key, key, override)
        if problem:
            return problem
    return check_overrides([i for i in overrides if i.startswith('data.')])


def eval_data_config(cfg: DictConfig, model: torch.nn.Module) -> DictConfig:
    """The data config with the model's own eval pipeline (unless ``transform=data``)."""
    data = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)
    if cfg.transform == 'model':
        pc = resolve_model_data_config(model)  # timm's reading of the model's pretrained_cfg
        data.update(img_size=int(pc['input_size'][-1]), crop_pct=float(pc['crop_pct']),
                    interpolation=pc['interpolation'], mean=list(pc['mean']), std=list(pc['std']))
    return OmegaConf.create(data)


class RemappedTargets(Dataset):
    """A data set whose labels are translated to the model's class indices."""

    def __init__(self, dataset: Dataset, mapping: Dict[int, int]):
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return img, self.mapping[int(target)]


def match_classes(cfg: DictConfig, dataset: Dataset, num_classes: int) -> Dataset:
    """Check the data set's classes against the model's head; apply ``class_map`` if given."""
    names = [str(c) for c in getattr(dataset, 'classes', [])]
    if cfg.class_map:
        raw = json.loads(Path(cfg.class_map).read_text())
        mapping = {}
        for i, name in enumerate(names):
            key = name if name in raw else str(i)
            if key not in raw:
                raise EvalError(f'class_map {cfg.class_map} has no entry for data set class {name!r} (index {i})')
            if not 0 <= int(raw[key]) < num_classes:
                raise EvalError(f'class_map {cfg.class_map}: {key!r} -> {raw[key]} is outside the model\'s '
                                f'{num_classes} classes')
            mapping[i] = int(raw[key])
        return RemappedTargets(dataset, mapping)
    if len(names) != num_classes:
        raise EvalError(
            f'the checkpoint\'s classifier has {num_classes} classes but data={cfg.data.name} has {len(names)} '
            f'({", ".join(names[:5])}{" ..." if len(names) > 5 else ""}). Evaluate on the data set it was trained '
            f'on, or give class_map=FILE.json mapping each data set class (name or index) to a model class index.')
    return dataset


def evaluate_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    cfg = to_plain(cfg)  # the schema's choices (amp, transform, ...) as plain strings; checked at composition
    info = engine.setup_distributed(cfg.device)
    run_dir = Path(engine.broadcast_object(HydraConfig.get().runtime.output_dir))
    ckpt = read_checkpoint(cfg.checkpoint)  # a RedNet of any format, or a timm baseline train.py trained
    backend = dict(involution_backend=cfg.involution_backend) if is_rednet(ckpt.arch) else {}
    model = model_from_checkpoint(ckpt, str(cfg.checkpoint), **backend)
    data_cfg = eval_data_config(cfg, model)
    dataset = match_classes(cfg, rdata.build_dataset(data_cfg, train=False), model.num_classes)
    loader = rdata.build_loader(dataset, cfg.batch_size, False, data_cfg.workers, 0, info.rank, info.world_size,
                                pin_memory=data_cfg.pin_memory and info.device.type == 'cuda')
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    stats = engine.evaluate(model, loader, info.device, cfg.amp, cfg.channels_last,
                            progress=cfg.progress and info.is_main)
    result = dict(checkpoint=str(cfg.checkpoint), arch=model.pretrained_cfg.get('architecture'),
                  data=cfg.data.name, top1=stats['top1'], top5=stats['top5'], loss=stats['loss'],
                  images=stats['images'], skipped_images=stats['skipped_images'],
                  img_per_sec=stats['img_per_sec'], time=stats['time'],
                  device=str(info.device), processes=info.world_size, amp=cfg.amp,
                  transform={k: OmegaConf.to_container(data_cfg)[k]
                             for k in ('img_size', 'crop_pct', 'interpolation', 'mean', 'std')})
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'eval.json').write_text(json.dumps(result, indent=2) + '\n')
    skipped = f' ({stats["skipped_images"]} unreadable skipped)' if stats['skipped_images'] else ''
    log(f'{result["arch"]} on {cfg.data.name}: top-1 {result["top1"]:.2f}%  top-5 {result["top5"]:.2f}%  '
        f'loss {result["loss"]:.4f}  {result["images"]} images{skipped}  {result["img_per_sec"]:.1f} img/s  '
        f'({run_dir / "eval.json"})')
    return result


@hydra.main(config_path='configs', config_name='eval', version_base=None)
def main(cfg: DictConfig) -> None:
    logging.captureWarnings(True)  # warnings go to the log (console and eval.log) like everything else
    is_main = int(os.environ.get('RANK', '0')) == 0
    with engine.log_to_file(str(Path(HydraConfig.get().runtime.output_dir) / 'eval.log') if is_main else None):
        engine.run_cli(evaluate_checkpoint, cfg, {EvalError: 2, CheckpointError: 2, FileNotFoundError: 2,
                                                  rdata.DataError: 2})


if __name__ == '__main__':
    engine.check_cli(check_eval_overrides)
    main()
