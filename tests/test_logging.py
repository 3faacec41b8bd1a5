"""train.py's logs: train.log in the run directory with everything the console shows, plain step lines every
train.log_every optimizer steps, the resolved config, and no carriage returns when the output is piped."""
import os
import re
import subprocess
import sys

from _train_utils import REPO, TINY


def test_piped_run_writes_train_log_with_step_and_epoch_lines(tmp_path):
    run_dir = tmp_path / 'run'
    args = TINY + ['train.epochs=1', 'train.log_every=2', 'train.progress=true', f'hydra.run.dir={run_dir}']
    # bytes, not text: text mode would turn the carriage returns of a progress bar into newlines
    r = subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, timeout=300,
                       env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert b'\r' not in r.stdout + r.stderr  # piped: no progress bar even with train.progress=true
    r.stdout = r.stdout.decode()
    log = (run_dir / 'train.log').read_text()
    # 64 images / batch 16 = 4 optimizer steps: lines at steps 2 and 4
    steps = re.findall(r'epoch 0 step (\d+)/4  loss [\d.]+ \(step [\d.]+\)  lr [\d.e-]+  [\d.]+ img/s  data \d+%  '
                       r'eta epoch \d+:\d\d:\d\d run \d+:\d\d:\d\d  peak rss \d+ MB', log)
    assert steps == ['2', '4'], log
    assert re.search(r'^\[[\d-]+ [\d:]+\] epoch 0: train_loss [\d.]+', log, re.M)  # timestamped epoch line
    for line in ('epoch 0: train_loss', 'epoch 0 step 2/4', f'config: {run_dir / "config.yaml"}',
                 f'tensorboard --logdir {run_dir / "tb"}'):
        assert line in log and line in r.stdout, line  # the console shows the same lines
    assert 'epochs: 1' in (run_dir / 'config.yaml').read_text()
