"""Shared helpers of the training tests: compose configs in-process, run train.py as a subprocess."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = str(REPO / 'configs')
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# a tiny, fast run: RedNet-26 with the small stem on 16x16 synthetic images with random crops and flips
TINY = ['model=rednet26', 'model.involution_backend=native', 'data=synthetic', 'data.img_size=16',
        'data.train_size=64', 'data.val_size=24', 'data.train_crop=pad', 'data.crop_padding=2', 'data.hflip=0.5',
        'train.batch_size=16', 'train.epochs=2', 'train.progress=false', 'train.deterministic=true',
        'train.threads=1']


def compose(overrides: Optional[List[str]] = None):
    """The composed config ``train.py`` would see for these command-line overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from rednet.train_config import register_schema
    register_schema()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return hydra_compose(config_name='train', overrides=list(overrides or []))


def run_train(args: List[str], env: Optional[dict] = None, torchrun: int = 0, timeout: int = 300,
              script: str = 'train.py', fault: Optional[str] = None):
    """Run ``train.py`` (or ``torchrun --nproc_per_node=N train.py``) from the repository root; with ``fault``
    (``KIND@STEP``, see ``_faulty_train.py``) through the launcher that injects it."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    if fault:
        script, args = 'tests/_faulty_train.py', [fault, *args]
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
               script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def torch_globals_kept():
    """In-process runs switch deterministic algorithms on and set the thread count: leave torch as it was."""
    import torch
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
        torch.set_num_threads(state[4])


@pytest.fixture
def restore_torch_globals():
    with torch_globals_kept():
        yield
