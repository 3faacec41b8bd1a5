"""The training loop end to end on tiny data: logs, checkpoints, exact resume after SIGKILL, SIGTERM,
non-finite losses, atomic saves, 2-process gloo DDP."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from _faulty_train import inject
from _train_utils import REPO, TINY, compose, run_train

import train  # noqa: E402
from rednet import engine


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """In-process runs switch deterministic algorithms on; leave torch as the next test expects it."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
    torch.set_num_threads(state[4])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_end_to_end_in_process(tmp_path):
    import rednet
    run_dir = tmp_path / 'run'
    cfg = compose(TINY)
    result = train.train(cfg, run_dir=str(run_dir))
    assert not result['interrupted']
    rows = _metrics(run_dir)
    assert [r['epoch'] for r in rows] == [0, 1]
    for r in rows:
        for key in ('epoch', 'train_loss', 'val_loss', 'val_top1', 'val_top5', 'lr', 'img_per_sec'):
            assert r[key] is not None, key
        assert r['val_top1'] <= r['val_top5'] and r['val_images'] == 24
        assert (r['val_top1'] * 24 / 100) == pytest.approx(round(r['val_top1'] * 24 / 100))  # counted images
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(run_dir / 'tb'))
    last = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    for key in ('model', 'arch', 'model_args', 'optimizer', 'scheduler', 'scaler', 'ema', 'epoch', 'step', 'rng',
                'config'):
        assert key in last, key
    assert last['arch'] == 'rednet26' and last['epoch'] == 1 and last['step'] == 8
    assert last['model_args'] == {'num_classes': 10, 'in_chans': 3, 'small_input': True, 'stem_kernel_size': 3,
                                  'kernel_size': 7, 'group_channels': 16, 'reduction_ratio': 4, 'dilation': 1}
    assert last['config']['train']['epochs'] == 2 and isinstance(last['rng'][0]['torch'], torch.Tensor)
    assert (run_dir / 'checkpoints' / 'best.pt').is_file()
    # rednet.load_model reads our checkpoints and gives the same outputs
    model = rednet.load_model(run_dir / 'checkpoints' / 'last.pt', involution_backend='native').eval()
    ref, _, _, _ = train.build_model(cfg, 10, engine.DistInfo())
    ref.load_state_dict(last['model'])
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), ref.eval()(x))
    assert not [f for f in os.listdir(run_dir / 'checkpoints') if f.startswith('.')]  # no temporary files left


def test_departures_run(tmp_path):
    """Mixup + CutMix, EMA, clipping, per-step cosine, no wd on BN/bias, gradient accumulation in one run."""
    run_dir = tmp_path / 'run'
    cfg = compose(TINY + ['train.epochs=1', 'train.mixup=0.2', 'train.cutmix=1.0', 'train.ema=true',
                          'train.ema_decay=0.5', 'train.clip_grad=1.0', 'schedule.per_step=true',
                          'optimizer.no_wd_norm_bias=true', 'train.grad_accum=2', 'train.batch_size=8',
                          'train.channels_last=true'])
    train.train(cfg, run_dir=str(run_dir))
    row = _metrics(run_dir)[0]
    assert row['val_top1_ema'] is not None and row['step'] == 4  # 64 images / (8 x 2)
    last = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert last['ema'] is not None
    assert not all(torch.equal(last['ema'][k], last['model'][k]) for k in last['model'])


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The reference run: 2 epochs, no interruption, with 2 data-loader workers and random augmentation."""
    run_dir = tmp_path_factory.mktemp('ref') / 'run'
    r = run_train(TINY + ['data.workers=2', f'hydra.run.dir={run_dir}'])
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def _run_own_session(args, fault):
    """train.py in a session (and process group) of its own, so a signal to its group reaches only it and its
    loader workers."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, 'tests/_faulty_train.py', fault, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)


def test_group_sigterm_then_sigkill_with_workers_resumes_bit_identical(tmp_path, uninterrupted):
    """data.workers=2: SIGTERM to the whole process group mid-epoch (as SLURM --signal and Kubernetes send it)
    saves a mid-epoch checkpoint and exits 0; the resumed run is killed with SIGKILL in epoch 1; the second
    resume ends with the weights, optimizer state and validation loss of the uninterrupted run, bit for bit."""
    run_dir = tmp_path / 'run'
    args = TINY + ['data.workers=2', f'hydra.run.dir={run_dir}']
    r = _run_own_session(args, 'TERMPG@2')  # the group gets SIGTERM after step 2; all stop after step 3
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'SIGTERM' in r.stdout and 'exited unexpectedly' not in r.stderr
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and not ckpt['epoch_complete'] and ckpt['step'] == 3 and ckpt['batches_done'] == 3
    assert not (run_dir / 'metrics.jsonl').read_text().strip()  # no epoch finished
    r = run_train(args + ['train.resume=auto'], fault='KILL@6')
    assert r.returncode == -signal.SIGKILL
    killed = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert killed['epoch'] == 0 and killed['epoch_complete'] and killed['step'] == 4
    r = run_train(args + ['train.resume=auto'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stdout
    a = torch.load(uninterrupted / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    b = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    _assert_same_weights(a['model'], b['model'])
    assert a['step'] == b['step'] == 8
    assert a['optimizer']['state'] and a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
    assert [m['epoch'] for m in _metrics(run_dir)] == [0, 1]
    assert [m['val_loss'] for m in _metrics(run_dir)] == [m['val_loss'] for m in _metrics(uninterrupted)]


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    inject('NAN@6', monkeypatch)
    with pytest.raises(engine.NonFiniteLossError) as e:
        train.train(compose(TINY), run_dir=str(run_dir))
    msg = str(e.value)
    assert 'optimizer step 6' in msg and 'epoch 1' in msg
    assert str(run_dir / 'checkpoints' / 'last.pt') in msg
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values()
                                      if v.is_floating_point())


def test_nonfinite_loss_skipped_when_configured(tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    inject('NAN@2', monkeypatch)
    with pytest.warns(UserWarning, match='non-finite loss.*skipping'):
        train.train(compose(TINY + ['train.skip_nonfinite=true', 'train.epochs=1']), run_dir=str(run_dir))
    row = _metrics(run_dir)[0]
    assert row['skipped_steps'] == 1 and row['step'] == 4
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def test_evaluate_under_bf16_autocast():
    """evaluate() against a hand computation in float32, and under bf16 autocast close to it; the head is random
    and large, so the loss is far from the ln 3 of an untrained head and the predictions vary."""
    import math
    import timm
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=3, small_input=True, involution_backend='native').eval()
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.no_grad():  # a large random head on centred features
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.nn.init.normal_(model.fc.weight, std=3.0 / float(feats.std(0).norm()))
        model.fc.bias.copy_(-model.fc.weight @ feats.mean(0))
        logits = model(x)
    want_loss = float(torch.nn.functional.cross_entropy(logits, y))
    want_top1 = 100.0 * float((logits.argmax(1) == y).double().mean())
    assert abs(want_loss - math.log(3)) > 0.3 and len(set(logits.argmax(1).tolist())) > 1
    data = [(x[:5], y[:5]), (x[5:], y[5:])]  # two batches of different sizes: per-sample averaging
    fp32 = engine.evaluate(model, data, torch.device('cpu'))
    assert fp32['images'] == 8 and fp32['top5'] == 100.0
    assert fp32['loss'] == pytest.approx(want_loss, rel=1e-5) and fp32['top1'] == pytest.approx(want_top1)
    bf16 = engine.evaluate(model, data, torch.device('cpu'), amp='bf16', channels_last=True)
    assert bf16['images'] == 8 and bf16['loss'] != fp32['loss']  # it did run in bf16
    assert bf16['loss'] == pytest.approx(want_loss, rel=0.05)


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'ck' / 'last.pt'
    engine.atomic_save({'x': torch.arange(4)}, str(path))

    def broken_save(obj, f):
        f.write(b'partial garbage')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        engine.atomic_save({'x': torch.zeros(4)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.arange(4))
    assert os.listdir(path.parent) == ['last.pt']
    engine.atomic_link_or_copy(str(path), str(tmp_path / 'ck' / 'best.pt'))
    engine.atomic_save({'x': torch.ones(4)}, str(path))  # best.pt keeps the old contents
    assert torch.equal(torch.load(tmp_path / 'ck' / 'best.pt', weights_only=True)['x'], torch.arange(4))


def test_sigkill_during_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / 'last.pt'
    code = (f'import torch, sys; sys.path.insert(0, {str(REPO)!r}); from rednet.engine import atomic_save\n'
            f'i = 0\n'
            f'while True:\n'
            f'    atomic_save({{"i": i, "x": torch.full((4_000_000,), float(i))}}, {str(path)!r}); i += 1\n')
    p = subprocess.Popen([sys.executable, '-c', code])
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    obj = torch.load(path, weights_only=True)
    assert torch.equal(obj['x'], torch.full((4_000_000,), float(obj['i'])))


def _params_sha256(state_dict):
    names = [n for n, _ in timm.create_model('rednet26', num_classes=10, small_input=True).named_parameters()]
    h = hashlib.sha256()
    for n in names:
        h.update(state_dict[n].flatten().view(torch.uint8).numpy())
    return h.hexdigest()


def test_ddp_without_gradient_averaging_diverges(tmp_path):
    """The negative control: with DDP's all-reduce replaced by a hook that keeps local gradients, the processes
    (which see different batches) end with different weights, and the run says so."""
    run_dir = tmp_path / 'run'
    r = run_train(TINY + ['train.epochs=1', 'data.train_size=32', 'data.val_size=8', f'hydra.run.dir={run_dir}'],
                  torchrun=2, script='tests/_ddp_no_average.py')
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['params_digests'][0] == _params_sha256(ckpt['model']) != ckpt['params_digests'][1]
    assert 'the 2 processes hold different weights' in r.stdout + r.stderr  # a warning, logged


def test_train_on_an_image_folder_with_a_bad_image(tmp_path):
    """The ImageNet-style pipeline (timm transforms, class folders, every colour mode) end to end."""
    from test_data import _make_folder
    root = _make_folder(tmp_path / 'ds', corrupt=True)
    args = ['model=rednet26', 'model.involution_backend=native', 'data=imagefolder', f'data.root={root}',
            'data.img_size=16', 'data.workers=0', 'train.batch_size=13', 'train.epochs=1', 'train.progress=false']
    with pytest.raises(Exception, match='broken.jpg'):
        train.train(compose(args), run_dir=str(tmp_path / 'run1'))
    with pytest.warns(UserWarning, match='broken.jpg'):
        train.train(compose(args + ['data.bad_images=skip']), run_dir=str(tmp_path / 'run2'))
    row = _metrics(tmp_path / 'run2')[0]
    assert row['val_images'] == 12 and row['step'] == 1  # one batch of all 13 training files (1 unreadable)
    assert row['skipped_images'] == 1 and row['val_skipped_images'] == 0


def test_eval_counts_each_image_once_and_reports_skipped_ones(tmp_path):
    """eval.py with data.bad_images=skip on a split of 12 readable images and 1 unreadable one: 12 images
    evaluated (none counted twice in place of the unreadable one) and skipped_images 1 in eval.json."""
    from test_data import _make_folder
    root = _make_folder(tmp_path / 'ds', corrupt=True)
    args = ['model=rednet26', 'model.involution_backend=native', 'data=imagefolder', f'data.root={root}',
            'data.img_size=16', 'data.workers=0', 'train.batch_size=12', 'train.epochs=1', 'train.progress=false',
            'data.bad_images=skip', 'optimizer.lr=0']
    with pytest.warns(UserWarning, match='broken.jpg'):
        train.train(compose(args), run_dir=str(tmp_path / 'run'))
    out = tmp_path / 'eval'
    r = subprocess.run([sys.executable, 'eval.py', f'checkpoint={tmp_path}/run/checkpoints/last.pt',
                        'data=imagefolder', f'data.root={root}', 'data.val_split=train', 'data.bad_images=skip',
                        'data.workers=2', 'batch_size=5', 'involution_backend=native', 'progress=false',
                        f'hydra.run.dir={out}'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / 'eval.json').read_text())
    assert result['images'] == 12 and result['skipped_images'] == 1
    assert '1 unreadable skipped' in r.stdout


def test_compiled_training_on_cpu_keeps_activations_nchw(tmp_path, monkeypatch):
    # train.compile=true compiles with inductor's layout optimisation off on the CPU: its channels_last activations
    # sum batch-norm statistics serially in float32 and flip ReLU masks (docs/gpu.md, "Compiled training precision";
    # the precision itself is tested in tests/test_compile.py). torch.compile is replaced by a recorder here.
    seen = []

    def fake_compile(model, **kwargs):
        seen.append(kwargs)
        return model
    monkeypatch.setattr(torch, 'compile', fake_compile)
    train.train(compose(TINY + ['train.compile=true', 'train.epochs=1']), run_dir=str(tmp_path / 'run'))
    assert len(seen) == 1 and seen[0].get('options') == {'layout_optimization': False}, seen
