"""2-process gloo DDP runs through torchrun: collective counts, BatchNorm buffers consistent across ranks."""
import json
import textwrap

import pytest
import torch

from _train_utils import REPO, TINY, run_train

# installed into every process torchrun starts (through PYTHONPATH): counts torch.distributed.all_reduce
# calls per rank and writes them at exit
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


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_ddp_one_sync_per_step_and_val_matches_eval_of_the_checkpoint(tmp_path):
    """torchrun 2 processes, train.grad_accum=4, 16 micro-batches per process (4 optimizer steps): each process
    makes at most one all-reduce per optimizer step plus a constant (epoch loss, validation, SIGTERM check);
    the logged val_top1/val_loss equal eval.py on the saved last.pt."""
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(_COUNTER)
    counts = tmp_path / 'counts'
    counts.mkdir()
    run_dir = tmp_path / 'run'
    env = {'PYTHONPATH': f'{site}:{REPO}', '_REDNET_COUNT_DIR': str(counts)}
    r = run_train(TINY + ['train.epochs=1', 'train.batch_size=2', 'train.grad_accum=4', 'data.val_size=23',
                          f'hydra.run.dir={run_dir}'], env=env, torchrun=2)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    row = _metrics(run_dir)[0]
    steps = row['step']
    assert steps == 4  # 64 images / (2 per micro-batch x 4 accumulated x 2 processes)
    for rank in (0, 1):
        n = json.loads((counts / f'rank{rank}.json').read_text())['all_reduce']
        assert 0 < n <= steps + 4, (rank, n)  # per micro-batch it would be >= 16
    ev = tmp_path / 'eval'
    import subprocess
    import sys
    e = subprocess.run([sys.executable, 'eval.py', f'checkpoint={run_dir}/checkpoints/last.pt', 'data=synthetic',
                        'data.img_size=16', 'data.val_size=23', 'data.workers=0', 'batch_size=7',
                        'involution_backend=native', 'progress=false', f'hydra.run.dir={ev}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    result = json.loads((ev / 'eval.json').read_text())
    assert result['images'] == row['val_images'] == 23
    assert result['top1'] == row['val_top1']
    assert result['loss'] == pytest.approx(row['val_loss'], rel=1e-5)
