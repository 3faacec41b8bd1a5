"""Config composition (the paper's recipe by default), the interface names, and errors before any work; the schema
as the one source of the defaults, its choices, and the data sets' recipes."""
import json
import math
import typing
from dataclasses import fields

import pytest
import torch
from omegaconf import OmegaConf

from _train_utils import REPO, TINY, compose, run_train, torch_globals_kept

import train  # noqa: E402  (repository root is on sys.path via _train_utils)
from rednet.engine import WarmupCosine
from rednet.train_config import (Choice, Config, DataConfig, DataName, InvolutionBackend, Interpolation,
                                 ModelConfig, OptimizerConfig, ScheduleConfig, TrainCrop, TrainSection,
                                 check_overrides, to_plain)


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
    # a command-line override still wins over the data set's recipe (configs/recipe/)
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
    with pytest.raises(Exception) as e:  # a choice: the schema's enum rejects it at composition
        compose(['model.involution_backend=cuda_magic'])
    assert 'native' in str(e.value.__cause__)
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
    r = run_train(['data.train_crop=rnd', f'hydra.run.dir={tmp_path}/run'], timeout=120)
    assert r.returncode == 2 and 'data.train_crop=rnd is not valid; choose one of: rrc, pad, none' in r.stderr
    assert not (tmp_path / 'run').exists()
    r = run_train(['checkpoint=x.pt', 'amp=fp32', f'hydra.run.dir={tmp_path}/run'], timeout=120, script='eval.py')
    assert r.returncode == 2 and 'amp=fp32 is not valid; choose one of: bf16, fp16, null' in r.stderr
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


# ---------------------------------------------------------------------------------------------------------
# the schema holds the defaults; the group files state only what differs; choices are enums

SCHEMAS = {'model': ModelConfig, 'data': DataConfig, 'optimizer': OptimizerConfig, 'schedule': ScheduleConfig,
           'train': TrainSection}


def _choices(schema, name):
    """The Choice enum of a schema field (``Amp`` for ``Optional[Amp]``), or None."""
    hint = typing.get_type_hints(schema)[name]
    return next((t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and issubclass(t, Choice)), None)


def _plain(value):
    return OmegaConf.to_container(value, enum_to_str=True) if OmegaConf.is_config(value) else value


def test_group_files_state_only_what_differs_from_the_schema():
    for group in ('model', 'data', 'optimizer', 'schedule'):
        defaults = OmegaConf.structured(SCHEMAS[group])
        files = sorted((REPO / 'configs' / group).glob('*.yaml'))
        assert files
        for path in files:
            assert '@package' not in path.read_text(), path  # a group file sets its own section only
            own = OmegaConf.load(path)
            assert own.name == path.stem.replace('_small', ''), path
            for key, value in own.items():
                assert key in defaults, f'{path}: {key} is not a key of the schema'
                if key != 'name':
                    assert _plain(value) != _plain(defaults[key]), f'{path}: {key}={value} is the schema default'
    # the primary configs set no keys at all: the schemas hold the defaults
    assert set(OmegaConf.load(REPO / 'configs' / 'train.yaml')) == {'defaults', 'hydra'}
    assert set(OmegaConf.load(REPO / 'configs' / 'eval.yaml')) == {'defaults', 'hydra'}
    # the recipes set training keys of the schema only
    recipes = sorted((REPO / 'configs' / 'recipe').glob('*.yaml'))
    assert [p.stem for p in recipes] == ['cifar10', 'cifar100', 'digits', 'synthetic']
    for path in recipes:
        assert path.read_text().startswith('# @package _global_\n'), path
        own = OmegaConf.load(path)
        assert set(own) <= {'train', 'optimizer', 'schedule'}, path
        for section, values in own.items():
            assert set(values) <= {f.name for f in fields(SCHEMAS[section])}, path


def test_the_schema_defaults_are_the_paper_recipe():
    """Composed from the schema alone, without any group file: the same as the default composition."""
    schema = OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)
    composed = OmegaConf.to_container(compose(), enum_to_str=True)
    schema['data']['num_classes'] = 1000  # the one key configs/data/imagenet.yaml sets (null: from the data set)
    assert composed == schema


def test_choices_are_the_codes_own_and_behave_as_strings():
    from timm.data import create_transform
    from timm.utils import dispatch_clip_grad
    from rednet import data as rdata
    from rednet.ops import BACKENDS
    assert [c.value for c in InvolutionBackend] == list(BACKENDS)
    assert [c.value for c in DataName] == list(rdata.DATASETS)
    for mode in Interpolation:  # every one works for the training crop and the eval resize
        create_transform(16, is_training=True, interpolation=mode)
        create_transform(16, is_training=False, interpolation=mode, crop_pct=0.875)
    p = torch.nn.Parameter(torch.ones(3, 3))
    p.grad = torch.ones(3, 3)
    for mode in _choices(TrainSection, 'clip_mode'):
        dispatch_clip_grad([p], 1.0, mode=mode)
    for schema in SCHEMAS.values():  # names are values: OmegaConf takes names, code compares values
        for f in fields(schema):
            assert all(c.name == c.value for c in _choices(schema, f.name) or ())
    pad = TrainCrop.pad
    assert pad == 'pad' and pad in ('rrc', 'pad') and {'pad': 1}[pad] == 1 and hash(pad) == hash('pad')
    assert str(pad) == f'{pad}' == f'{pad:>3}' == 'pad' and json.dumps({'c': pad}) == '{"c": "pad"}'
    cfg = compose(['data=digits', 'model=rednet26'])
    assert isinstance(cfg.data.name, DataName)  # typed while composing ...
    plain = to_plain(cfg)  # ... plain strings for the run
    assert type(plain.data.name) is str and plain.data.name == 'digits' and type(plain.data.train_crop) is str
    assert plain.train.amp is None and type(plain.schedule.name) is str
    with pytest.raises(Exception):  # still a struct: a misspelt key fails
        plain.train.epocs  # noqa: B018


@pytest.mark.parametrize('key,bad', [('data.name', 'imagenet21k'), ('data.train_crop', 'rnd'),
                                     ('data.interpolation', 'random'), ('data.bad_images', 'ignore'),
                                     ('schedule.name', 'step'), ('train.amp', 'fp32'), ('train.clip_mode', 'max'),
                                     ('model.involution_backend', 'cuda_magic')])
def test_a_bad_choice_fails_early_naming_the_valid_ones(key, bad):
    section, name = key.split('.')
    valid = [c.value for c in _choices(SCHEMAS[section], name)]
    with pytest.raises(Exception) as e:  # at composition (a value in a config file too)
        compose([f'{key}={bad}'])
    assert all(v in str(e.value.__cause__) for v in valid), e.value.__cause__
    msg = check_overrides([f'{key}={bad}'])  # on the command line, before Hydra: train.py's message
    assert msg.startswith(f'{key}={bad} is not valid; choose one of: {", ".join(valid)}'), msg
    assert check_overrides(['-m', f'{key}={valid[0]},{bad}']).startswith(f'{key}={bad} is not valid')
    assert check_overrides([f'{key}={valid[-1]}', f'~{key}']) is None
    assert OmegaConf.select(compose([f'{key}={valid[-1]}']), key) == valid[-1]
    assert check_overrides(['train.amp=null']) is None and compose(['train.amp=bf16']).train.amp == 'bf16'


def test_eval_schema_has_no_training_sections_and_checks_its_choices():
    import eval as eval_script
    from hydra import compose as hydra_compose, initialize_config_dir
    keys = [f.name for f in fields(eval_script.EvalConfig)]
    assert not {'model', 'train', 'optimizer', 'schedule'} & set(keys)
    assert eval_script.EVAL_KEYS == keys
    with initialize_config_dir(config_dir=str(REPO / 'configs'), version_base=None):
        cfg = hydra_compose(config_name='eval', overrides=['checkpoint=x.pt', 'data=digits'])
        assert set(cfg) == {'data', *keys} and cfg.data.img_size == 12 and cfg.transform == 'model'
        with pytest.raises(Exception) as e:
            hydra_compose(config_name='eval', overrides=['checkpoint=x.pt', 'transform=dataset'])
        assert 'model, data' in str(e.value.__cause__)
    check = eval_script.check_eval_overrides
    assert check(['checkpoint=x', 'transform=dataset']) == 'transform=dataset is not valid; choose one of: model, data'
    assert 'bf16, fp16, null' in check(['checkpoint=x', 'amp=fp32'])
    assert 'native' in check(['checkpoint=x', 'involution_backend=cuda'])
    assert 'rrc, pad, none' in check(['checkpoint=x', 'data.train_crop=rnd'])
    assert check(['checkpoint=x', 'amp=bf16', 'transform=data', 'involution_backend=native', 'data=digits']) is None


def test_recipes_follow_their_data_set_and_the_command_line_wins():
    d = compose(['model=rednet26', 'data=digits'])  # the README demo: configs/recipe/digits.yaml
    o = d.optimizer
    assert (o.name, o.lr, o.lr_base_batch, o.weight_decay, o.no_wd_norm_bias, list(o.betas)) == \
        ('adamw', 2e-3, 32, 0.05, True, [0.9, 0.999])
    assert (d.train.epochs, d.train.batch_size, d.train.label_smoothing, d.train.threads) == (5, 32, 0.0, 1)
    assert (d.schedule.name, d.schedule.per_step, d.schedule.warmup_epochs) == ('cosine', True, 0.5)
    assert (d.data.img_size, d.data.train_crop, d.data.crop_padding, d.data.hflip) == (12, 'pad', 1, 0.0)
    s = compose(['data=synthetic'])
    assert (s.train.epochs, s.schedule.warmup_epochs, s.optimizer.name) == (2, 0, 'sgd')
    # the command line wins over the recipe, wherever it stands
    assert compose(['data=digits', 'optimizer.lr=0.01']).optimizer.lr == 0.01
    assert compose(['optimizer.lr=0.01', 'data=digits', 'train.epochs=7']).train.epochs == 7
    assert compose(['data=digits', 'optimizer=sgd']).optimizer.name == 'adamw'  # the recipe's, as before
    # another data set's recipe, or none
    other = compose(['data=imagefolder', 'recipe=digits'])
    assert (other.data.name, other.optimizer.name, other.train.epochs) == ('imagefolder', 'adamw', 5)
    bare, default = compose(['data=digits', '~recipe']), compose()
    for section in ('train', 'optimizer', 'schedule'):
        assert bare[section] == default[section]
    assert bare.data.name == 'digits'
    # the data sets without a recipe get the schema's (the paper's) training settings
    assert compose(['data=imagefolder']).optimizer == default.optimizer
    # a misspelt recipe would be skipped silently (the group is optional): the command line check names them
    msg = check_overrides(['recipe=digit'])
    assert 'recipe=digit is not a recipe' in msg and 'cifar10, cifar100, digits, synthetic' in msg
    assert check_overrides(['recipe=digits', 'data=digits']) is None and check_overrides(['~recipe']) is None
    assert check_overrides(['-m', 'recipe=digits,cifar10']) is None


def test_run_dir_interpolates_plain_names():
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / 'configs'), version_base=None):
        cfg = hydra_compose(config_name='train', overrides=['data=digits', 'model=rednet26'],
                            return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith('outputs/digits-rednet26/')
    assert cfg.hydra.runtime.choices.recipe == 'digits'


def test_checkpoint_holds_plain_strings_and_loads_with_weights_only(tmp_path):
    """A tiny run with non-default choices: its checkpoint loads with weights_only=True (an enum would not), and
    its config, config.yaml and metrics hold plain strings."""
    run_dir = tmp_path / 'run'
    overrides = TINY + ['train.epochs=1', 'train.clip_grad=1.0', 'train.clip_mode=value', 'schedule=constant',
                        'data.interpolation=bicubic']
    with torch_globals_kept():
        train.train(compose(overrides), run_dir=str(run_dir))
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert type(k) is str
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            assert type(value) is str, repr(value)

    for key in ('config', 'model_args', 'scheduler', 'metrics', 'layout'):
        walk(ckpt[key])
    c = ckpt['config']
    assert (c['data']['name'], c['data']['train_crop'], c['data']['interpolation'], c['schedule']['name'],
            c['train']['clip_mode'], c['model']['involution_backend'], c['train']['amp']) == \
        ('synthetic', 'pad', 'bicubic', 'constant', 'value', 'native', None)
    assert 'clip_mode: value' in ckpt['config_yaml'] and 'name: constant' in ckpt['config_yaml']
    assert OmegaConf.load(run_dir / 'config.yaml').data.train_crop == 'pad'
    assert 'Choice' not in (run_dir / 'config.yaml').read_text() + ckpt['config_yaml']
    import rednet
    model = rednet.load_model(run_dir / 'checkpoints' / 'last.pt')  # and eval.py's loader reads it
    assert model.num_classes == 10
