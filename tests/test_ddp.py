"""2-process gloo DDP runs through torchrun: one all-reduce per optimizer step, BatchNorm statistics identical
on every rank before validation and saves, and a kill -9 at a random step resumed to the same weights."""
import json
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from _train_utils import REPO, TINY, run_train
from test_train import _params_sha256

pytestmark = pytest.mark.slow

# installed into every process torchrun starts (through PYTHONPATH): counts torch.distributed.all_reduce calls
# per rank and writes them at exit
_COUNTER = textwrap.dedent('''
    import atexit, json, os
    if 'LOCAL_RANK' in os.environ and os.environ.get('_REDNET_COUNT_DIR'):
        import torch.distributed as dist
        _calls = {'all_reduce': 0}
        _real = dist.all_reduce

        def all_reduce(*args, **kwargs):
            _calls['all_reduce'] += 1
            return _real(*args, **kwargs)
        dist.all_reduce = all_reduce

        def _write():
            path = os.path.join(os.environ['_REDNET_COUNT_DIR'], 'rank%s.json' % os.environ['RANK'])
            with open(path, 'w') as f:
                json.dump(_calls, f)
        atexit.register(_write)
''')

# 2 processes x 2 images x 4 accumulated micro-batches: 64 images make 4 optimizer steps (16 micro-batches) per
# epoch; EMA with a fast decay so that per-rank BatchNorm statistics would show in its validation
DDP = TINY + ['train.batch_size=2', 'train.grad_accum=4', 'data.val_size=23', 'train.ema=true',
              'train.ema_decay=0.5']
STEPS_PER_EPOCH = 4


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The uninterrupted 2-epoch run, with all-reduce calls counted per rank."""
    tmp = tmp_path_factory.mktemp('ddp')
    (tmp / 'site').mkdir()
    (tmp / 'site' / 'sitecustomize.py').write_text(_COUNTER)
    (tmp / 'counts').mkdir()
    run_dir = tmp / 'run'
    env = {'PYTHONPATH': f'{tmp / "site"}:{REPO}', '_REDNET_COUNT_DIR': str(tmp / 'counts')}
    r = run_train(DDP + [f'hydra.run.dir={run_dir}'], env=env, torchrun=2)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    counts = [json.loads((tmp / 'counts' / f'rank{k}.json').read_text())['all_reduce'] for k in (0, 1)]
    return run_dir, r, counts


def test_ddp_two_processes_gloo(reference):
    run_dir, r, _ = reference
    assert r.stdout.count('epoch 0: train_loss') == 1  # only rank 0 logs
    rows = _metrics(run_dir)
    assert [row['val_images'] for row in rows] == [23, 23]  # every validation image counted once
    assert [row['step'] for row in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    ckpt = _load(run_dir / 'checkpoints' / 'last.pt')
    assert ckpt['world_size'] == 2 and len(ckpt['rng']) == 2
    assert not any(k.startswith('module.') for k in ckpt['model'])
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])
    assert 'lr 0.00625 for global batch 16' in r.stdout  # 0.1 x (2 x 2 x 4) / 256
    # gradient averaging keeps the two processes' weights identical, bit for bit, and they are the saved ones
    # (test_train.test_ddp_without_gradient_averaging_diverges is the negative control)
    assert ckpt['params_digests'][0] == ckpt['params_digests'][1] == _params_sha256(ckpt['model'])
    assert 'hold different weights' not in r.stdout + r.stderr


def test_at_most_one_all_reduce_per_optimizer_step(reference):
    """Per process: at most the optimizer steps plus a constant per epoch (epoch loss, validation, EMA
    validation, SIGTERM check); with a flag all-reduce per micro-batch it would be >= 32."""
    _, _, counts = reference
    steps = 2 * STEPS_PER_EPOCH
    print(f'all-reduces per process: {counts} for {steps} optimizer steps')
    for n in counts:
        assert 0 < n <= steps + 2 * 4, counts


def _eval(checkpoint, out):
    e = subprocess.run([sys.executable, 'eval.py', f'checkpoint={checkpoint}', 'data=synthetic', 'data.img_size=16',
                        'data.val_size=23', 'data.workers=0', 'batch_size=7', 'involution_backend=native',
                        'progress=false', f'hydra.run.dir={out}'], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    return json.loads((out / 'eval.json').read_text())


def test_logged_validation_is_that_of_the_saved_checkpoint(reference, tmp_path):
    """The last epoch's logged val_top1/val_loss (and the EMA's) equal eval.py on the saved last.pt (and on its
    EMA weights): every rank validated the BatchNorm statistics that rank 0 saved."""
    run_dir, _, _ = reference
    row = _metrics(run_dir)[-1]
    result = _eval(run_dir / 'checkpoints' / 'last.pt', tmp_path / 'eval')
    assert result['images'] == row['val_images'] == 23
    assert result['top1'] == row['val_top1']
    assert result['loss'] == pytest.approx(row['val_loss'], rel=1e-5)
    # the EMA weights, evaluated in this process the way eval.py does (one eval.py run is enough)
    import rednet
    from rednet import data as rdata
    from rednet.engine import evaluate
    ckpt = _load(run_dir / 'checkpoints' / 'last.pt')
    torch.save({**ckpt, 'model': ckpt['ema']}, tmp_path / 'ema.pt')
    model = rednet.load_model(tmp_path / 'ema.pt', involution_backend='native')
    val = rdata.build_dataset(dict(name='synthetic', img_size=16, val_size=23, num_classes=10, mean=[0.5] * 3,
                                   std=[0.5] * 3), train=False)  # configs/data/synthetic.yaml
    ema = evaluate(model, rdata.build_loader(val, 7, False), torch.device('cpu'))
    assert ema['images'] == 23 and ema['top1'] == row['val_top1_ema']
    assert ema['loss'] == pytest.approx(row['val_loss_ema'], rel=1e-5)


def test_chaos_kill9_at_a_random_step_resumes_to_the_same_weights(reference, tmp_path):
    """kill -9 both processes after a random optimizer step of epoch 1 (seeded, so CI is deterministic),
    resume with train.resume=auto: the final weights, optimizer and EMA state equal the uninterrupted run's."""
    step = random.Random(10).randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1)
    run_dir = tmp_path / 'run'
    args = DDP + [f'hydra.run.dir={run_dir}']
    r = run_train(args, fault=f'KILL@{step}', torchrun=2)
    assert r.returncode != 0 and f'Signal {int(signal.SIGKILL)}' in r.stderr or 'SIGKILL' in r.stderr, \
        r.stderr[-3000:]
    assert _load(run_dir / 'checkpoints' / 'last.pt')['step'] == STEPS_PER_EPOCH
    r = run_train(args + ['train.resume=auto'], torchrun=2)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    a, b = _load(reference[0] / 'checkpoints' / 'last.pt'), _load(run_dir / 'checkpoints' / 'last.pt')
    assert a['step'] == b['step'] == 2 * STEPS_PER_EPOCH
    for key in ('model', 'ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
