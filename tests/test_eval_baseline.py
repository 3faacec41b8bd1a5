"""eval.py and rednet.load_model on a checkpoint that train.py wrote for a timm baseline (model=resnet26)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _train_utils import REPO, TINY, compose

import train  # noqa: E402
import rednet


@pytest.fixture(scope='module')
def resnet_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('resnet') / 'run'
    train.train(compose(TINY + ['model=resnet26', 'train.epochs=1']), run_dir=str(run_dir))
    return run_dir


def test_load_model_rebuilds_a_trained_timm_baseline(resnet_run):
    ckpt = torch.load(resnet_run / 'checkpoints' / 'last.pt', map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'resnet26' and ckpt['model_args']['small_input'] is True
    model = rednet.load_model(resnet_run / 'checkpoints' / 'last.pt').eval()
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)  # the 32x32 stem
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg['input_size'] == (3, 16, 16)  # the data pipeline it was trained with
    new_head = rednet.load_model(resnet_run / 'checkpoints' / 'last.pt', num_classes=3)
    assert new_head.fc.out_features == 3 and torch.equal(new_head.conv1.weight, ckpt['model']['conv1.weight'])
    with pytest.raises(rednet.checkpoint.CheckpointError, match='has no involution_backend'):
        rednet.load_model(resnet_run / 'checkpoints' / 'last.pt', involution_backend='native')


def test_eval_reproduces_the_logged_accuracy_of_a_timm_baseline(resnet_run, tmp_path):
    logged = json.loads((resnet_run / 'metrics.jsonl').read_text().splitlines()[-1])
    cmd = [sys.executable, 'eval.py', 'progress=false', f'checkpoint={resnet_run / "checkpoints" / "last.pt"}',
           'data=synthetic', 'data.img_size=16', 'data.train_size=64', 'data.val_size=24',
           f'hydra.run.dir={tmp_path / "eval"}']
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
    assert out['images'] == logged['val_images'] == 24
    assert out['top1'] == pytest.approx(logged['val_top1'])
    assert out['loss'] == pytest.approx(logged['val_loss'], rel=1e-4)
    assert f"top-1 {out['top1']:.2f}%" in (tmp_path / 'eval' / 'eval.log').read_text()  # the log file has the result
