"""Resuming with a changed config: the schedule is rebuilt from the current config (epochs, batch size,
processes, accumulation) and continues at the same point of training, as a fresh run of that config would."""
import json
import math

import pytest
import torch

from _faulty_train import inject
from _train_utils import TINY, compose

import train  # noqa: E402
from test_train import _restore_torch_globals  # noqa: F401  (autouse: leaves torch's globals as found)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def _cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    """2 epochs, then train.epochs=4 train.resume=auto: epochs 2 and 3 get the lr of a fresh 4-epoch run
    (the paper's per-epoch cosine: lr x (1 + cos(pi e / 4)) / 2), not the finished 2-epoch schedule's 0."""
    run_dir = tmp_path / 'run'
    args = TINY + ['schedule.warmup_epochs=0', 'data.train_size=32', 'data.val_size=8']
    train.train(compose(args), run_dir=str(run_dir))
    train.train(compose(args + ['train.epochs=4', 'train.resume=auto']), run_dir=str(run_dir))
    assert 'resume with a changed config: train.epochs 2 -> 4' in (run_dir / 'train.log').read_text()
    rows = _metrics(run_dir)
    assert [r['epoch'] for r in rows] == [0, 1, 2, 3]
    base = 0.1 * 16 / 256  # optimizer.lr per 256 images x global batch 16
    for r in rows[2:]:
        assert r['lr'] == pytest.approx(base * _cosine(r['epoch'] / 4), rel=1e-9, abs=1e-15), r['epoch']
    assert rows[-1]['step'] == 4 * 2  # 32 images / 16 per step, 4 epochs


def test_resume_with_another_batch_size_continues_at_the_same_fraction(tmp_path, monkeypatch):
    """Stopped (SIGTERM) halfway through a 1-epoch run at batch 16 (4 steps), resumed at batch 8 (8 steps):
    the run continues at step 4 of 8 with lr 0.1 x 8 / 256 and the per-step cosine over 8 steps, as a fresh
    batch-8 run has at that point."""
    run_dir = tmp_path / 'run'
    args = TINY + ['schedule.warmup_epochs=0', 'schedule.per_step=true', 'train.epochs=1', 'data.val_size=8']
    with pytest.MonkeyPatch.context() as mp:
        inject('TERM@1', mp)  # SIGTERM after step 1: the loop stops after step 2
        result = train.train(compose(args), run_dir=str(run_dir))
    assert result['interrupted']
    ckpt = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['batches_done'] == 2 and ckpt['step'] == 2
    train.train(compose(args + ['train.batch_size=8', 'train.resume=auto']), run_dir=str(run_dir))
    out = (run_dir / 'train.log').read_text()
    assert 'train.batch_size 16 -> 8' in out and 'optimizer step 4 of 8' in out
    rows = _metrics(run_dir)
    base = 0.1 * 8 / 256
    # metrics' lr is that of the epoch's last step, step 7 of 8 (counted from 0)
    assert rows[0]['lr'] == pytest.approx(base * _cosine(7 / 8), rel=1e-9)
    assert rows[0]['step'] == 8
    last = torch.load(run_dir / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert last['layout']['batch_size'] == 8 and last['layout']['steps_per_epoch'] == 8
