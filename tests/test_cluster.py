"""Cluster launchers: the SLURM script keeps one run directory and requeues itself on a signal, Hydra group
overrides (hydra/launcher=...) pass check_overrides, and the submitit launcher runs train.py (no SLURM needed)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from _train_utils import REPO

from rednet.train_config import check_overrides

FAKE_SRUN = '''#!/bin/bash
echo "$@" > "$FAKE_DIR/srun_args"
trap 'echo "srun got TERM" >> "$FAKE_DIR/log"; exit 0' TERM
while true; do sleep 0.1; done
'''
FAKE_SCONTROL = '''#!/bin/bash
if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$FAKE_DIR/log"; fi
'''


@pytest.mark.parametrize('sig', [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_script_forwards_the_signal_and_requeues_into_the_same_run_dir(tmp_path, sig):
    """With stand-ins for srun and scontrol: the run directory comes from the job name (not the job id), and
    the time-limit (USR1) or preemption (TERM) signal reaches training, then the job requeues itself."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_DIR': str(tmp_path),
           'SLURM_JOB_ID': '4242', 'SLURM_JOB_NAME': 'r50', 'SLURM_JOB_NODELIST': 'node1', 'SLURM_JOB_NUM_NODES': '1'}
    env.pop('RUN_DIR', None)
    p = subprocess.Popen(['bash', str(REPO / 'scripts' / 'slurm_train.sh'), 'model=rednet26'], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / 'srun_args').exists() and time.time() < deadline:
        time.sleep(0.05)
    args = (tmp_path / 'srun_args').read_text()
    assert 'hydra.run.dir=runs/r50 ' in args and 'train.resume=auto' in args and '4242' not in args.split('train.py')[1]
    assert args.rstrip().endswith('model=rednet26')
    p.send_signal(sig)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert (tmp_path / 'log').read_text().splitlines() == ['srun got TERM', 'scontrol requeue 4242']
    assert 'requeueing' in out


def test_check_overrides_accepts_group_overrides_and_still_names_unknown_keys():
    ok = ['hydra/launcher=submitit_slurm', 'hydra/launcher=submitit_local', 'model=rednet26', 'schedule=constant',
          '+hydra.launcher.timeout_min=60', 'train.epochs=1,2', 'optimizer.lr=range(0.1,0.3,0.1)',
          "data.root='/my data'", '-m', '--cfg', 'job']
    assert check_overrides(ok) is None
    msg = check_overrides(['hydra/launcher=submitit_local', 'train.epocs=3'])
    assert 'train.epocs' in msg and 'Did you mean train.epochs?' in msg
    assert 'trian' in check_overrides(['trian.epochs=3'])
    assert 'cannot parse' in check_overrides(['train.epochs=[1,'])


def test_submitit_local_launcher_runs_a_sweep_job(tmp_path):
    pytest.importorskip('hydra_plugins.hydra_submitit_launcher', reason="pip install -e '.[slurm]'")
    sweep = tmp_path / 'sweep'
    args = ['-m', 'hydra/launcher=submitit_local', 'hydra.launcher.timeout_min=5', f'hydra.sweep.dir={sweep}',
            'model=rednet26', 'model.involution_backend=native', 'data=synthetic', 'data.img_size=16',
            'data.train_size=32', 'data.val_size=8', 'train.batch_size=16', 'train.epochs=1', 'train.progress=false',
            'train.threads=1']
    r = subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Submitit 'local' sweep" in r.stdout + r.stderr
    rows = [json.loads(line) for line in (sweep / '0' / 'metrics.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [0] and rows[0]['step'] == 2
    assert (sweep / '0' / 'checkpoints' / 'last.pt').is_file()
