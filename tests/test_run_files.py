"""What a killed run leaves behind does not block the next one; bad input gives clear errors."""
import json
import pickle

import numpy as np
import pytest

from _train_utils import TINY, compose

import train  # noqa: E402
from test_train import _restore_torch_globals  # noqa: F401  (autouse: leaves torch's globals as found)
from rednet.checkpoint import CheckpointError, read_checkpoint

SMALL = TINY + ['data.train_size=32', 'data.val_size=8']


def test_truncated_metrics_line_and_stale_temp_files_do_not_block_resume(tmp_path):
    """A kill while appending to metrics.jsonl leaves a truncated last line, a kill during a save leaves
    .NAME.tmp-PID files: resume=auto drops the line with a warning, removes the files and completes."""
    run_dir = tmp_path / 'run'
    train.train(compose(SMALL + ['train.epochs=1']), run_dir=str(run_dir))
    with open(run_dir / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": 1, "step": 4, "train_lo')  # cut off mid-write
    stale = [run_dir / 'checkpoints' / '.last.pt.tmp-999999', run_dir / '.metrics.jsonl.tmp-999998']
    for path in stale:
        path.write_bytes(b'partial')
    with pytest.warns(UserWarning, match=r'metrics.jsonl: dropping unreadable line 2'):
        train.train(compose(SMALL + ['train.epochs=2', 'train.resume=auto']), run_dir=str(run_dir))
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1]
    assert not any(path.exists() for path in stale)


def test_mixup_drops_an_odd_last_batch_and_needs_an_even_batch_size(tmp_path):
    """23 images in batches of 16: timm's Mixup asserts on the odd last batch of 7, so it is dropped."""
    cfg = compose(SMALL + ['data.train_size=23', 'train.epochs=1', 'train.mixup=0.2', 'train.cutmix=1.0'])
    train.train(cfg, run_dir=str(tmp_path / 'run'))
    row = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
    assert row['step'] == 1
    with pytest.raises(train.ConfigError, match='even train.batch_size'):
        train.train(compose(SMALL + ['train.batch_size=15', 'train.mixup=0.2']), run_dir=str(tmp_path / 'r2'))


def test_paddle_object_arrays_raise_checkpoint_error(tmp_path):
    path = tmp_path / 'weights.pdparams'
    with open(path, 'wb') as f:
        pickle.dump({'conv1.weight': np.array(['not', 'weights', 3], dtype=object)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"'conv1.weight' is an array of object"):
        read_checkpoint(path)
