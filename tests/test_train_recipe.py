"""The training recipe follows its formulas: clipped SGD steps, EMA, label smoothing, warmup x cosine, and the
digits demo really learns. Expected values come from the formulas and hand calculations, not from the code."""
import json
import math

import pytest
import timm
import torch

from _faulty_train import inject
from _train_utils import TINY, compose, restore_torch_globals, torch_globals_kept  # noqa: F401

import train  # noqa: E402


pytestmark = pytest.mark.usefixtures('restore_torch_globals')


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _param_names():
    model = timm.create_model('rednet26', num_classes=10, small_input=True)
    return [name for name, _ in model.named_parameters()]


def _norm(a, b, names):
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in names))


LR, CLIP, DECAY = 10.0, 0.01, 0.75


@pytest.fixture(scope='module')
def two_plain_steps(tmp_path_factory):
    """Two optimizer steps of plain SGD (no momentum, no weight decay, constant lr) from known weights w0, with
    gradient clipping and EMA, stopped by SIGTERM after step 1 and resumed: returns (w0, checkpoint after step 1,
    checkpoint after step 2)."""
    d = tmp_path_factory.mktemp('steps')
    # no zero-initialised last BN: every residual branch gets a gradient at the first step
    w0 = timm.create_model('rednet26', num_classes=10, small_input=True, zero_init_last=False).state_dict()
    torch.save(w0, d / 'w0.pth')
    overrides = TINY + ['data.train_size=16', 'data.val_size=8', 'train.batch_size=16', 'train.epochs=2',
                     'schedule=constant', 'optimizer.nesterov=false', 'optimizer.momentum=0.0',
                     'optimizer.weight_decay=0.0', f'optimizer.lr={LR}', 'optimizer.lr_base_batch=null',
                     f'train.clip_grad={CLIP}', 'train.ema=true', f'train.ema_decay={DECAY}',
                     f'model.pretrained={d / "w0.pth"}', 'train.label_smoothing=0.0']
    run_dir = d / 'run'
    with pytest.MonkeyPatch.context() as mp, torch_globals_kept():
        inject('TERM@1', mp)
        assert train.train(compose(overrides), run_dir=str(run_dir))['interrupted']
    first = _load(run_dir / 'checkpoints' / 'last.pt')
    assert first['step'] == 1 and first['epoch_complete']
    with torch_globals_kept():
        train.train(compose(overrides + ['train.resume=auto']), run_dir=str(run_dir))
    second = _load(run_dir / 'checkpoints' / 'last.pt')
    assert second['step'] == 2
    return w0, first, second


def test_every_weight_moves_and_clipping_bounds_the_step(two_plain_steps):
    """SGD without momentum: w1 - w0 = -lr x clipped gradient, so the step's norm is exactly lr x clip (the
    unclipped gradient norm of a fresh network on this data is far above ``CLIP``)."""
    w0, first, second = two_plain_steps
    names = _param_names()
    moved = [k for k in names if not torch.equal(first['model'][k], w0[k])]
    assert moved == names  # every parameter tensor got a gradient and a step
    assert _norm(first['model'], w0, names) == pytest.approx(LR * CLIP, rel=1e-3)
    assert _norm(second['model'], first['model'], names) == pytest.approx(LR * CLIP, rel=1e-3)


def test_ema_follows_its_formula(two_plain_steps):
    """ema_2 = decay x ema_1 + (1 - decay) x w_2 for every parameter (ema_1 read from the step-1 checkpoint)."""
    _, first, second = two_plain_steps
    for k in _param_names():
        want = DECAY * first['ema'][k].double() + (1 - DECAY) * second['model'][k].double()
        torch.testing.assert_close(second['ema'][k].double(), want, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(second['ema']['fc.weight'], second['model']['fc.weight'])


def test_label_smoothing_follows_its_formula():
    """(1 - eps) x CE + eps x mean over classes of -log p; by hand for p = (0.1, 0.2, 0.3, 0.4), target 3."""
    eps = 0.1
    criterion, mixup = train.build_loss(compose(['train.label_smoothing=0.1']), 4)
    assert mixup is None
    p = [0.1, 0.2, 0.3, 0.4]
    logits = torch.tensor([[math.log(v) for v in p]])
    want = (1 - eps) * -math.log(0.4) + eps * sum(-math.log(v) for v in p) / 4  # 0.9754688...
    assert float(criterion(logits, torch.tensor([3]))) == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.9754688, abs=1e-6)
    plain, _ = train.build_loss(compose(['train.label_smoothing=0.0']), 4)
    assert float(plain(logits, torch.tensor([3]))) == pytest.approx(-math.log(0.4), rel=1e-6)


# lr multipliers by hand: 4 epochs of 2 steps, warmup over 3 steps from 0.25, cosine per epoch to min_lr
# step:      0      1         2                 3                 4    5    6                 7
_PER_EPOCH = [0.25, 0.5, 0.75 * 0.853553390593, 0.853553390593, 0.5, 0.5, 0.146446609407, 0.146446609407]


def test_warmup_cosine_schedule_follows_its_formula():
    cfg = compose(['train.epochs=4', 'schedule=cosine', 'schedule.warmup_epochs=1.5', 'schedule.warmup_ratio=0.25',
                   'schedule.min_lr=0.0'])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    sched = train.build_schedule(cfg, opt, steps_per_epoch=2)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    # warmup k = (1 - it / 3) x (1 - 0.25): lr x (1 - k) = 0.25, 0.5, 0.75 at steps 0, 1, 2; cosine of epoch e:
    # (1 + cos(pi e / 4)) / 2 = 1, 0.8536, 0.5, 0.1464
    assert lrs == pytest.approx([0.8 * m for m in _PER_EPOCH], rel=1e-9)
    # per step with a floor: min + (max - min) x (1 + cos(pi t / 8)) / 2, no warmup
    cfg = compose(['train.epochs=4', 'schedule=cosine', 'schedule.per_step=true', 'schedule.warmup_epochs=0',
                   'schedule.min_lr=0.08'])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    sched = train.build_schedule(cfg, opt, steps_per_epoch=2)
    for t in range(8):
        assert opt.param_groups[0]['lr'] == pytest.approx(0.08 + 0.72 * (1 + math.cos(math.pi * t / 8)) / 2)
        opt.step()
        sched.step()


@pytest.mark.slow
def test_digits_demo_learns(tmp_path):
    """The README's demo (``train.py model=rednet26 data=digits``, 98-99.5% in 5 epochs) shortened to 2 epochs:
    the loss falls and validation top-1 reaches 90% (chance: 10%; measured: 94.2%, train loss 1.23 -> 0.38)."""
    run_dir = tmp_path / 'run'
    train.train(compose(['model=rednet26', 'data=digits', 'train.epochs=2', 'train.progress=false']),
                run_dir=str(run_dir))
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert rows[0]['train_loss'] < math.log(10)  # below the loss of a uniform guess
    assert rows[1]['train_loss'] < 0.7 * rows[0]['train_loss'] and rows[1]['val_loss'] < rows[0]['val_loss']
    assert rows[1]['val_images'] == 360 and rows[1]['val_top1'] >= 90.0
