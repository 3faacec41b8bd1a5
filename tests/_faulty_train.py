"""Fault injection for the training tests, from outside the training loop: :func:`inject` wraps
``rednet.engine.train_one_epoch`` so that a signal arrives, or the loss turns NaN, at a chosen optimizer step.

A fault is ``KIND@STEP``:

- ``KILL``: SIGKILL to the process after optimizer step STEP;
- ``TERM``: SIGTERM to the process after step STEP (the loop sees it at the next step and stops after it);
- ``TERMPG``: SIGTERM to the whole process group after step STEP, as SLURM's ``--signal`` and Kubernetes send
  it; only where the group is a session of its own (``start_new_session=True``), so a test runner is never hit;
- ``NAN``: the loss of every micro-batch of step STEP is NaN.

STEP counts the optimizer steps of the run (skipped ones included), also after a resume: it is read from the lr
scheduler, which ``train.py`` positions at the run's step and ``train_one_epoch`` steps once per optimizer step.

In process: ``inject('TERM@2', monkeypatch)`` before ``train.train(...)``. As a program, ``train.py`` with a
fault, run exactly as ``python train.py`` runs it (Hydra's command line; ``torchrun`` can start it too):

    python tests/_faulty_train.py KILL@6 model=rednet26 data=digits ...
"""
import functools
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Callable, Tuple

REPO = Path(__file__).resolve().parents[1]
KINDS = ('KILL', 'TERM', 'TERMPG', 'NAN')


def parse(fault: str) -> Tuple[str, int]:
    kind, _, at = fault.partition('@')
    if kind not in KINDS or not at.isdigit():
        raise ValueError(f'a fault is KIND@STEP with KIND one of {", ".join(KINDS)}, got {fault!r}')
    return kind, int(at)


def _send(kind: str) -> None:
    if kind == 'KILL':
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == 'TERM':
        os.kill(os.getpid(), signal.SIGTERM)
    elif os.getpgid(0) == os.getsid(0):  # TERMPG, in a session of its own only
        os.killpg(os.getpgid(0), signal.SIGTERM)


class _SignalAfterStep:
    """The lr scheduler, which sends the fault's signal when it has stepped to optimizer step ``at``."""

    def __init__(self, scheduler, kind: str, at: int):
        self.scheduler, self.kind, self.at = scheduler, kind, at

    def step(self) -> None:
        self.scheduler.step()
        if self.scheduler.last_epoch == self.at:
            _send(self.kind)

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


def _nan_at_step(criterion: Callable, scheduler, at: int) -> Callable:
    """The criterion, whose loss is NaN during optimizer step ``at`` (the scheduler is at ``at - 1`` then)."""
    def criterion_with_nan(output, target):
        loss = criterion(output, target)
        return loss * float('nan') if scheduler.last_epoch + 1 == at else loss
    return criterion_with_nan


def faulty(train_one_epoch: Callable, fault: str) -> Callable:
    """``train_one_epoch`` with ``fault`` injected through its scheduler or criterion argument."""
    kind, at = parse(fault)

    @functools.wraps(train_one_epoch)
    def train_one_epoch_with_fault(model, loader, optimizer, scheduler, criterion, *args, **kwargs):
        if kind == 'NAN':
            criterion = _nan_at_step(criterion, scheduler, at)
        else:
            scheduler = _SignalAfterStep(scheduler, kind, at)
        return train_one_epoch(model, loader, optimizer, scheduler, criterion, *args, **kwargs)
    return train_one_epoch_with_fault


def inject(fault: str, monkeypatch) -> None:
    """Make ``train.train`` (which calls ``engine.train_one_epoch``) meet ``fault``, until ``monkeypatch`` undoes
    it."""
    from rednet import engine
    monkeypatch.setattr(engine, 'train_one_epoch', faulty(engine.train_one_epoch, fault))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO))
    from rednet import engine
    fault, sys.argv = sys.argv[1], [str(REPO / 'train.py'), *sys.argv[2:]]
    engine.train_one_epoch = faulty(engine.train_one_epoch, fault)
    runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
