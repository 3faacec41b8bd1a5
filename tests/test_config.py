"""Config composition (the paper's recipe by default), the interface names, and errors before any work."""
import math

import pytest
import torch

from _train_utils import compose, run_train

import train  # noqa: E402  (repository root is on sys.path via _train_utils)
from rednet.engine import WarmupCosine
from rednet.train_config import check_overrides


def test_default_is_the_paper_imagenet_recipe():
    cfg = compose()
    assert cfg.model.name == 'rednet50' and cfg.data.name == 'imagenet'
    o = cfg.optimizer
    assert (o.name, o.nesterov, o.lr, o.lr_base_batch, o.momentum, o.weight_decay, o.no_wd_norm_bias) == \
        ('sgd', True, 0.1, 256, 0.9, 1e-4, False)
    s = cfg.schedule
    assert (s.name, s.per_step, s.warmup_epochs, s.warmup_ratio, s.min_lr) == ('cosine', False, 5, 0.25, 0.0)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.label_smoothing, t.mixup, t.cutmix, t.ema, t.clip_grad, t.sync_bn, t.amp) == \
        (130, 32, 0.1, 0.0, 0.0, False, None, False, None)
    d = cfg.data
    assert (d.img_size, d.crop_pct, d.train_crop, list(d.scale), d.hflip, d.color_jitter, d.auto_augment,
            d.re_prob, d.interpolation) == (224, 0.875, 'rrc', [0.08, 1.0], 0.5, 0.0, None, 0.0, 'bilinear')
    assert list(d.mean) == [0.485, 0.456, 0.406] and list(d.std) == [0.229, 0.224, 0.225]
    assert cfg.model.small_input is None  # automatic: ImageNet stem at 224


def test_imagenet_transforms_match_the_recipe():
    from rednet.data import build_transform
    cfg = compose()
    tr, ev = repr(build_transform(cfg.data, True)), repr(build_transform(cfg.data, False))
    assert 'RandomResizedCrop' in tr and 'scale=(0.08, 1.0)' in tr and 'bilinear' in tr
    assert 'RandomHorizontalFlip(p=0.5)' in tr and 'ColorJitter' not in tr
    assert 'Resize(size=256' in ev and 'CenterCrop(size=(224, 224))' in ev


def test_interface_overrides():
    cfg = compose(['model=rednet26_small', 'data=imagefolder', 'data.root=/some/where', 'train.epochs=3',
                   'train.batch_size=7', 'train.resume=auto', 'train.deterministic=true'])
    assert cfg.model.name == 'rednet26' and cfg.model.small_input is True
    assert (cfg.data.name, cfg.data.root, cfg.train.epochs, cfg.train.batch_size, cfg.train.resume,
            cfg.train.deterministic) == ('imagefolder', '/some/where', 3, 7, 'auto', True)
    for depth in (26, 38, 50, 101, 152):
        assert compose([f'model=rednet{depth}']).model.name == f'rednet{depth}'
        assert compose([f'model=rednet{depth}_small']).model.small_input is True
    assert compose(['model=resnet50']).model.name == 'resnet50'


def test_departures_are_one_override_each():
    cfg = compose(['schedule.per_step=true', 'optimizer.no_wd_norm_bias=true', 'train.mixup=0.2',
                   'train.cutmix=1.0', 'data.auto_augment=rand-m9-mstd0.5-inc1', 'train.ema=true',
                   'train.clip_grad=5.0', 'train.sync_bn=true'])
    assert cfg.schedule.per_step and cfg.optimizer.no_wd_norm_bias and cfg.train.ema and cfg.train.sync_bn
    assert (cfg.train.mixup, cfg.train.cutmix, cfg.train.clip_grad) == (0.2, 1.0, 5.0)
    assert cfg.data.auto_augment == 'rand-m9-mstd0.5-inc1'


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_recipe(name, classes):
    cfg = compose([f'data={name}', 'model=rednet26'])
    assert (cfg.data.num_classes, cfg.data.img_size, cfg.data.train_crop, cfg.data.crop_padding, cfg.data.hflip) \
        == (classes, 32, 'pad', 4, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size) == (200, 128)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_base_batch, cfg.optimizer.weight_decay) == (0.1, 128, 5e-4)
    assert cfg.schedule.name == 'cosine' and cfg.schedule.warmup_epochs == 0
    # a command-line override still wins over the data config's recipe
    assert compose([f'data={name}', 'train.epochs=3']).train.epochs == 3


def test_digits_selects_the_small_stem():
    cfg = compose(['model=rednet26', 'data=digits'])
    assert cfg.data.img_size <= 64 and cfg.model.small_input is None
    model, _, arch, model_args = train.build_model(cfg, 10, train.engine.DistInfo())
    assert arch == 'rednet26' and model_args['small_input'] is True
    assert model.stem.conv1.conv.stride == (1, 1)


def test_unknown_group_choice_lists_the_choices():
    with pytest.raises(Exception) as e:
        compose(['model=rednet51'])
    assert 'rednet26_small' in str(e.value) and 'rednet50' in str(e.value)


def test_unknown_key_names_the_valid_keys():
    msg = check_overrides(['train.epocs=3'])
    assert 'epocs' in msg and 'train.epochs' in msg and 'batch_size' in msg
    assert check_overrides(['foo.bar=1']) and 'train' in check_overrides(['foo.bar=1'])
    assert check_overrides(['train.epochs=3', 'model=rednet26', 'hydra.run.dir=x', 'data.root=/d']) is None
    with pytest.raises(Exception):  # the schema also rejects it when composing
        compose(['train.epocs=3'])


def test_wrong_type_fails():
    with pytest.raises(Exception) as e:
        compose(['train.epochs=many'])
    assert 'epochs' in str(e.value)
    cfg = compose(['model.involution_backend=cuda_magic'])
    with pytest.raises(train.ConfigError, match='native'):
        train.validate_config(cfg)
    with pytest.raises(train.ConfigError, match='rednet26'):
        train.validate_config(compose(['model.name=rednet51']))


def test_cli_rejects_bad_key_before_any_work(tmp_path):
    r = run_train(['train.epocs=3', f'hydra.run.dir={tmp_path}/run'], timeout=120)
    assert r.returncode != 0
    assert 'train.epochs' in r.stderr and 'Valid keys' in r.stderr
    assert not (tmp_path / 'run').exists()
    r = run_train(['model=rednet51', f'hydra.run.dir={tmp_path}/run'], timeout=120)
    assert r.returncode != 0 and 'rednet26_small' in r.stderr + r.stdout
    assert not (tmp_path / 'run').exists()


def _mmcv_reference(it, base_lr, epochs, ipe, warmup_iters, ratio):
    """The paper's schedule as mmcv computes it (CosineAnnealingLrUpdaterHook, by_epoch, linear warmup)."""
    epoch = it // ipe
    regular = 0 + (base_lr - 0) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - ratio)
        return regular * (1 - k)
    return regular


def test_schedule_matches_the_paper_numerically():
    cfg = compose()
    model = torch.nn.Linear(2, 2)
    opt, lr = train.build_optimizer(cfg, model, global_batch=2048)
    assert lr == pytest.approx(0.8)
    sched = train.build_schedule(cfg, opt, steps_per_epoch=626)
    lrs = []
    for it in range(130 * 626):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2)  # warmup starts at 0.25 x lr
    for it in (0, 1, 625, 626, 1565, 3129, 3130, 3131, 5000, 626 * 65, 626 * 129 + 3, 130 * 626 - 1):
        assert lrs[it] == pytest.approx(_mmcv_reference(it, 0.8, 130, 626, 3130, 0.25), rel=1e-9, abs=1e-12)
    # after warmup, per-epoch: constant within an epoch
    assert lrs[626 * 10] == lrs[626 * 10 + 300] == lrs[626 * 11 - 1] > lrs[626 * 11]
    # per-step variant: changes every step, same warmup start
    fn = WarmupCosine(130, 626, 3130, 0.25, 0.0, per_step=True)
    assert fn(626 * 10) > fn(626 * 10 + 300) > fn(626 * 11 - 1)
    assert fn(0) == pytest.approx(0.25)


def test_weight_decay_on_all_parameters_unless_asked():
    import timm
    model = timm.create_model('rednet26', num_classes=10, small_input=True)
    opt, _ = train.build_optimizer(compose(), model, 256)
    assert all(g['weight_decay'] == 1e-4 for g in opt.param_groups)
    assert all(g['nesterov'] and g['momentum'] == 0.9 for g in opt.param_groups)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == \
        sum(p.numel() for p in model.parameters())
    opt, _ = train.build_optimizer(compose(['optimizer.no_wd_norm_bias=true']), model, 256)
    no_wd = [p for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']]
    assert no_wd and all(p.ndim <= 1 for p in no_wd)
    assert id(model.stem.bn.weight) in {id(p) for p in no_wd}
