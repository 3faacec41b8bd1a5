"""``train.py`` with DDP's gradient averaging switched off (a communication hook that keeps each process's own
gradients): the negative control of the test that data-parallel processes end with identical weights."""
import runpy
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]


def _keep_local_gradients(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class NoAveraging(nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, _keep_local_gradients)


if __name__ == '__main__':
    nn.parallel.DistributedDataParallel = NoAveraging
    sys.path.insert(0, str(REPO))
    sys.argv = [str(REPO / 'train.py'), *sys.argv[1:]]
    runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
