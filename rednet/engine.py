"""The training and evaluation loops and their plumbing, for ``train.py`` and ``eval.py``.

- :func:`train_one_epoch` (the run's settings in a :class:`TrainSetup`, where it stands in a :class:`Progress`),
  :func:`evaluate` (loss, top-1/top-5 in percent, images, img/s; metrics reduced across processes);
- distributed setup/teardown (torchrun's ``env://``; NCCL on CUDA, gloo on CPU) and reductions;
- :class:`WarmupCosine`: the paper's schedule (per-iteration linear warmup from a fraction of the lr, cosine
  stepped per epoch or per iteration);
- atomic checkpoint files, RNG state capture/restore as tensors (``torch.load(weights_only=True)`` reads them);
- non-finite loss handling and a SIGTERM (preemption) flag.
"""
import contextlib
import logging
import math
import os
import random
import signal
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import timm.utils
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DistInfo', 'setup_distributed', 'cleanup_distributed', 'reduce_sum', 'broadcast_object',
           'WarmupCosine', 'NonFiniteLossError', 'StopFlag', 'atomic_write', 'atomic_save',
           'atomic_link_or_copy', 'log', 'log_to_file', 'StepLog', 'run_cli', 'broadcast_buffers',
           'reduce_tensor_sum', 'remove_stale_temp_files',
           'capture_rng_state', 'restore_rng_state', 'set_deterministic',
           'autocast', 'accuracy', 'TrainSetup', 'Progress', 'train_one_epoch', 'evaluate']


# ---------------------------------------------------------------------------------------------------------
# distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``).

    Under Hydra's submitit launcher (``SUBMITIT_EXECUTOR`` set), submitit's ``TorchDistributedEnvironment``
    exports them from the SLURM task. Without those variables: a single process. Device: ``device`` if given, else CUDA (``cuda:LOCAL_RANK``)
    when available, else CPU. Backend: NCCL on CUDA, gloo on CPU, unless ``backend`` says otherwise.
    """
    if 'RANK' not in os.environ and os.environ.get('SUBMITIT_EXECUTOR'):
        # a task of hydra/launcher=submitit_*: one process of the group per task, ranks from SLURM
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if dev.index is None:
            dev = torch.device('cuda', local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world_size, local_rank, world_size > 1, dev)
    if info.distributed and not dist.is_initialized():
        backend = backend or ('nccl' if dev.type == 'cuda' else 'gloo')
        kwargs = dict(device_id=dev) if backend == 'nccl' else {}
        dist.init_process_group(backend=backend, init_method='env://', **kwargs)
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


logger = logging.getLogger('rednet')
logger.setLevel(logging.INFO)


def log(*args: Any) -> None:
    """Log a line (``logging``, logger ``rednet``) on rank 0 only."""
    if int(os.environ.get('RANK', '0')) == 0:
        logger.info(' '.join(str(a) for a in args))


@contextlib.contextmanager
def log_to_file(path: Optional[str]):
    """While the block runs, every log record (rednet's, Hydra's and, under the command line, warnings) also goes
    to ``path`` with a timestamp; an exception that leaves the block is written there too. Outside Hydra (a
    ``train.train`` call from Python) the lines also go to stdout. ``path=None`` (other ranks): only that."""
    root = logging.getLogger()
    added = []
    if not root.handlers:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter('%(message)s'))
        added.append(console)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        file = logging.FileHandler(path)
        file.setFormatter(logging.Formatter('[%(asctime)s] %(message)s', '%Y-%m-%d %H:%M:%S'))
        added.append(file)
    for handler in added:
        root.addHandler(handler)
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        if path is not None:
            file.handle(logging.makeLogRecord(dict(name='rednet', levelno=logging.ERROR, levelname='ERROR',
                                                   msg=f'error: {type(e).__name__}: {e}')))
        raise
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def check_cli(check: Callable[[List[str]], Optional[str]]) -> None:
    """Before Hydra composes anything: exit 2 with ``error: ...`` when ``check`` finds a problem in the command
    line's overrides (an unknown key, with the valid ones listed)."""
    problem = check(sys.argv[1:])
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        sys.exit(2)


def run_cli(body: Callable[[Any], Any], cfg: Any, exit_codes: Dict[type, int]) -> None:
    """Run an entry point's body: an expected error (a type in ``exit_codes``) prints ``error: ...`` and exits
    with its code instead of a traceback; the process group is torn down either way."""
    try:
        body(cfg)
    except tuple(exit_codes) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(next(code for cls, code in exit_codes.items() if isinstance(e, cls)))
    cleanup_distributed()


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_sum(values: List[float], device: torch.device) -> List[float]:
    """Sum a list of numbers over all processes (identity in a single process)."""
    if not _dist_on():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _reduce_max_flags(flags: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Make every process's buffers (BatchNorm running statistics) those of rank ``src``.

    Called before each validation and checkpoint, so the accuracy logged for an epoch is that of the weights
    saved for it. Broadcast rather than average (timm's ``distribute_bn``): DDP itself broadcasts rank 0's
    buffers at the next synchronised forward (``broadcast_buffers=True``), so this changes nothing the
    training sees, keeps resumed runs bit-identical, and saves exactly the statistics that will be evaluated.
    One broadcast per dtype (the buffers flattened together).
    """
    if not _dist_on():
        return
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault((b.dtype, b.device), []).append(b)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src)
        for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(v.view_as(b))


# ---------------------------------------------------------------------------------------------------------
# learning-rate schedule

class WarmupCosine:
    """lr multiplier at optimizer step ``it``, for ``torch.optim.lr_scheduler.LambdaLR`` stepped per iteration.

    The paper (mmcv ``CosineAnnealingLrUpdaterHook`` with linear warmup): the cosine counts from epoch 0 over all
    ``epochs`` and is evaluated at whole epochs (``per_step=False``) or at every step (``per_step=True``);
    during the first ``warmup_iters`` steps it is multiplied by
    ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``, i.e. warmup starts at ``warmup_ratio`` x lr.
    ``name='constant'`` keeps the multiplier at 1 after warmup. A callable object, so LambdaLR's
    ``state_dict`` saves its settings.
    """

    def __init__(self, epochs: int, iters_per_epoch: int, warmup_iters: int = 0, warmup_ratio: float = 0.25,
                 min_ratio: float = 0.0, per_step: bool = False, name: str = 'cosine'):
        if name not in ('cosine', 'constant'):
            raise ValueError(f"schedule.name must be 'cosine' or 'constant', got {name!r}")
        self.epochs, self.iters_per_epoch = int(epochs), max(int(iters_per_epoch), 1)
        self.warmup_iters, self.warmup_ratio = int(warmup_iters), float(warmup_ratio)
        self.min_ratio, self.per_step, self.name = float(min_ratio), bool(per_step), name

    def __call__(self, it: int) -> float:
        if self.name == 'cosine':
            if self.per_step:
                progress = it / (self.epochs * self.iters_per_epoch)
            else:
                progress = (it // self.iters_per_epoch) / self.epochs
            progress = min(progress, 1.0)
            factor = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        if it < self.warmup_iters:
            factor *= 1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor


# ---------------------------------------------------------------------------------------------------------
# checkpoints, RNG

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the same folder, fsync it, then ``os.replace`` it onto
    ``path``: a kill at any moment leaves either the previous file or the new one, never a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    with contextlib.suppress(OSError):
        os.remove(tmp)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete the temporary files of :func:`atomic_write` that killed saves left in ``folder`` (call before
    the run writes anything there); returns their names."""
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith('.') and '.tmp-' in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
    return removed


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
    atomic_write(path, write)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def atomic_link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link when the file system allows, else a copy)."""
    atomic_write(dst, lambda tmp: _link_or_copy(src, tmp))


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and numbers (``weights_only`` loadable)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        'python_version': int(version),
        'python': torch.tensor(py_state, dtype=torch.int64),
        'python_gauss': gauss,
        'numpy_name': str(np_name),
        'numpy': torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        'numpy_pos': int(np_pos),
        'numpy_has_gauss': int(np_has_gauss),
        'numpy_cached_gaussian': float(np_cached),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate((state['python_version'], tuple(int(v) for v in state['python'].tolist()),
                     state['python_gauss']))
    np.random.set_state((state['numpy_name'], state['numpy'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (cuDNN, cuBLAS) or the fastest ones (cuDNN benchmark)."""
    if enabled:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


# ---------------------------------------------------------------------------------------------------------
# signals, non-finite losses

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class StopFlag:
    """Set by SIGTERM (preemption, ``scancel``, torchrun shutting down) or SIGUSR2 (submitit's and SLURM's
    ``--signal`` of choice): the loop finishes the current step, saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR2)) -> 'StopFlag':
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def pass_on(self) -> None:
        """After the graceful save: uninstall, and hand the signal to the Python handler that was installed
        before ours, if any (under ``hydra/launcher=submitit_slurm``: submitit's, which requeues the job)."""
        previous = self._previous.get(self.signum)
        self.uninstall()
        if callable(previous):
            previous(self.signum, None)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum


# ---------------------------------------------------------------------------------------------------------
# loops

def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in (None, 'bf16', 'fp16')."""
    if not amp:
        return contextlib.nullcontext()
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> List[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    return [int(h) for h in _hits(logits, target, topk)]


def _hits(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """:func:`accuracy` as a tensor on the logits' device (no host synchronisation)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


def _to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def _unpack(batch) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(images, target, skipped): loaders of :func:`rednet.data.build_loader` add the number of unreadable
    images the batch left out (``data.bad_images=skip``); plain ``(images, target)`` batches have none."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def reduce_tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place (identity in a single process)."""
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _StepSums:
    """Per-process sums of one epoch kept as tensors on the device, so micro-batches never wait for the host.

    ``group_*`` collect the micro-batches of the optimizer step in progress; :meth:`commit` adds them to the
    epoch totals when the step is taken, :meth:`discard` drops them when it is skipped (non-finite loss).
    """

    def __init__(self, device: torch.device):
        z = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss, self.group_loss, self.bad = z(torch.float64), z(torch.float64), z(torch.bool)
        self.one, self.zero = torch.ones((), device=device), torch.zeros((), device=device)
        self.images, self.group_images, self.skipped_images = 0, 0, 0  # host counts (known without syncs)

    def add(self, loss: torch.Tensor, n: int, skipped: Optional[torch.Tensor]) -> None:
        loss = loss.detach().double()
        self.bad |= ~torch.isfinite(loss)
        self.group_loss += loss * n
        self.group_images += n
        if skipped is not None:  # a CPU tensor from the loader: reading it waits for no device
            self.skipped_images += int(skipped)

    def flags(self, stop: bool) -> torch.Tensor:
        """[any micro-batch of the step non-finite, SIGTERM seen]: the one small all-reduce of a step."""
        return _reduce_max_flags(torch.stack([self.bad.float(), self.one if stop else self.zero]))

    def commit(self) -> None:
        self.loss += self.group_loss
        self.images += self.group_images
        self.discard()

    def discard(self) -> None:
        self.group_loss.zero_()
        self.bad.zero_()
        self.group_images = 0


class StepLog:
    """What the training loop reports every ``every`` optimizer steps (rank 0): a plain log line with the epoch,
    step/total, loss, lr, img/s, the fraction of time spent waiting for data, the ETA of the epoch and of the
    run, and peak memory (CUDA) or peak RSS; the step loss and lr to TensorBoard (``writer``); and, with
    ``bar=True`` (a terminal), a tqdm bar above which the lines are printed."""

    def __init__(self, every: int = 20, epochs: int = 1, writer: Any = None, bar: bool = False):
        self.every, self.epochs, self.writer, self.use_bar = max(int(every), 1), int(epochs), writer, bar
        self.world = dist.get_world_size() if _dist_on() else 1
        self.bar = self._redirect = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def start_epoch(self, epoch: int, steps_per_epoch: int, step_in_epoch: int, micro_batches: Tuple[int, int]):
        self.epoch, self.steps_per_epoch, self.first_step = epoch, steps_per_epoch, step_in_epoch
        self.start = self.last = time.perf_counter()
        self.data_time, self.images = 0.0, 0
        if self.use_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self.bar = tqdm(total=micro_batches[1], initial=micro_batches[0], desc=f'epoch {epoch}',
                            dynamic_ncols=True, mininterval=1.0, leave=False)

    def batch_ready(self) -> None:
        """A micro-batch came out of the loader: the time since the last one finished was spent waiting."""
        now = time.perf_counter()
        self.data_time += now - self.last

    def batch_done(self, images: int) -> None:
        self.images += images
        self.last = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)

    def step(self, global_step: int, step_in_epoch: int, step_loss: float, epoch_loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar('train/loss_step', step_loss, global_step)
            self.writer.add_scalar('train/lr_step', lr, global_step)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_step = elapsed / max(step_in_epoch - self.first_step, 1)
        left_epoch = self.steps_per_epoch - step_in_epoch
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps_per_epoch
        img_s = self.images * self.world / elapsed
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{epoch_loss:.4f}', lr=f'{lr:.3g}', img_s=f'{img_s:.1f}', refresh=False)
        log(f'epoch {self.epoch} step {step_in_epoch}/{self.steps_per_epoch}  loss {epoch_loss:.4f} '
            f'(step {step_loss:.4f})  lr {lr:.4g}  {img_s:.1f} img/s  data {100 * self.data_time / elapsed:.0f}%  '
            f'eta epoch {_duration(left_epoch * per_step)} run {_duration(left_run * per_step)}  {_peak_memory()}')

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = self._redirect = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f'peak mem {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB'
    import resource
    return f'peak rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB'  # Linux: KiB


def _nonfinite_error(where: str, last_checkpoint: Optional[str]) -> NonFiniteLossError:
    ckpt = last_checkpoint or 'none written yet'
    return NonFiniteLossError(
        f'{where}. Stopping instead of training on NaNs. Last good checkpoint: {ckpt} (resume with '
        f'train.resume=auto, perhaps with a lower optimizer.lr or train.clip_grad=5.0; or set '
        f'train.skip_nonfinite=true to skip such steps)')


@dataclass
class TrainSetup:
    """How :func:`train_one_epoch` trains: the settings of the whole run, built once by ``train.py``."""
    device: torch.device = torch.device('cpu')
    grad_accum: int = 1                              # micro-batches per optimizer step
    steps_per_epoch: Optional[int] = None            # None: as many as the loader's batches make
    amp: Optional[str] = None                        # None | 'bf16' | 'fp16' (autocast)
    scaler: Optional[torch.amp.GradScaler] = None    # fp16's loss scaling
    clip_grad: Optional[float] = None                # None: no clipping
    clip_mode: str = 'norm'                          # norm | value | agc (timm's dispatch_clip_grad)
    mixup_fn: Optional[Callable] = None              # timm's Mixup/CutMix
    ema: Optional[nn.Module] = None                  # timm's ModelEmaV3, updated after every step
    channels_last: bool = False
    skip_nonfinite: bool = False                     # skip a step with a non-finite loss instead of stopping
    stop: Optional[StopFlag] = None                  # SIGTERM: leave the epoch at the next step boundary
    steplog: StepLog = field(default_factory=StepLog)


@dataclass
class Progress:
    """Where the run is. :func:`train_one_epoch` starts from it and moves it on."""
    global_step: int = 0                             # optimizer steps taken (skipped ones included)
    batches_done: int = 0                            # micro-batches of the epoch whose step is taken
    last_checkpoint: Optional[str] = None            # named when a non-finite loss stops the run


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, setup: TrainSetup) -> None:
    from timm.utils import dispatch_clip_grad
    scaler = setup.scaler
    if setup.clip_grad:
        if scaler is not None:
            scaler.unscale_(optimizer)
        dispatch_clip_grad(model.parameters(), setup.clip_grad, mode=setup.clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
                    criterion: Callable, epoch: int, setup: TrainSetup, progress: Progress) -> Dict[str, Any]:
    """One epoch, or what remains of it after ``progress.batches_done`` micro-batches.

    Every ``setup.grad_accum`` micro-batches make one optimizer step followed by ``scheduler.step()``;
    ``progress.global_step`` counts them and ``progress.batches_done`` ends at the micro-batches done in the
    epoch. Returns ``loss`` (mean per sample over all processes), ``images`` (all processes), ``img_per_sec``,
    ``time``, ``lr`` (of the last step), ``skipped_steps``, ``skipped_images`` (unreadable images left out, all
    processes) and ``interrupted`` (SIGTERM: the epoch was left early at a step boundary). A non-finite loss
    raises :class:`NonFiniteLossError` naming the step and ``progress.last_checkpoint``, or with
    ``setup.skip_nonfinite`` skips the step with a warning.

    Host synchronisation: none per micro-batch; one per optimizer step, where the non-finite and SIGTERM flags
    of all processes travel together in one two-element all-reduce; losses stay on the device and are read
    every ``setup.steplog.every`` steps (log line, TensorBoard, progress bar) and at the end of the epoch.
    """
    model.train()
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    device, grad_accum, scaler, steplog = setup.device, setup.grad_accum, setup.scaler, setup.steplog
    batch_idx = progress.batches_done
    steps_per_epoch = setup.steps_per_epoch
    if steps_per_epoch is None:
        steps_per_epoch = (len(loader) + batch_idx) // grad_accum  # the loader skips the done samples
    last_batch = steps_per_epoch * grad_accum  # leftover micro-batches that make no full step are dropped
    sums = _StepSums(device)
    skipped, interrupted = 0, False
    lr = optimizer.param_groups[0]['lr']
    steplog.start_epoch(epoch, steps_per_epoch, batch_idx // grad_accum, (batch_idx, last_batch))
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    try:
        for batch in loader:
            if batch_idx >= last_batch:
                break
            steplog.batch_ready()
            images, target, skipped_images = _unpack(batch)
            images, target = _to_device(images, target, device, setup.channels_last)
            if setup.mixup_fn is not None:
                images, target = setup.mixup_fn(images, target)
            is_step = (batch_idx + 1) % grad_accum == 0
            sync = contextlib.nullcontext() if (is_step or not is_ddp) else model.no_sync()
            with sync:
                with autocast(device, setup.amp):
                    output = model(images)
                    loss = criterion(output, target)
                scaled = loss / grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            sums.add(loss, images.shape[0], skipped_images)
            batch_idx += 1
            steplog.batch_done(images.shape[0])
            if not is_step:
                continue
            step = progress.global_step + 1
            log_now = steplog.due(step)
            flags = sums.flags(setup.stop is not None and setup.stop.requested)
            if log_now:  # read the losses in the same host synchronisation as the flags
                bad, stop_seen, step_loss, epoch_loss = torch.cat(
                    [flags.double(), (sums.group_loss / max(sums.group_images, 1)).view(1),
                     (sums.loss / max(sums.images, 1)).view(1)]).tolist()
            else:
                bad, stop_seen = flags.tolist()
            if bad > 0:
                where = (f'non-finite loss at epoch {epoch}, optimizer step {step} (micro-batches '
                         f'{batch_idx - grad_accum}-{batch_idx - 1} of the epoch)')
                if not setup.skip_nonfinite:
                    raise _nonfinite_error(where, progress.last_checkpoint)
                warnings.warn(f'{where}: skipping this optimizer step (train.skip_nonfinite=true)')
                skipped += 1
                sums.discard()
            else:
                _optimizer_step(model, optimizer, setup)
                if setup.ema is not None:
                    setup.ema.update(timm.utils.unwrap_model(model), step=step)
                sums.commit()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]['lr']
            scheduler.step()
            progress.global_step, progress.batches_done = step, batch_idx
            if log_now:
                steplog.step(step, batch_idx // grad_accum, step_loss, epoch_loss, lr)
            if stop_seen > 0:  # SIGTERM seen by any process before this step: all stop here
                interrupted = True
                break
    finally:
        steplog.end_epoch()
    elapsed = time.perf_counter() - start
    counts = torch.tensor([sums.images, sums.skipped_images], dtype=torch.float64, device=device)
    totals = torch.cat([sums.loss.view(1), counts])
    loss_sum, count, skipped_images = reduce_tensor_sum(totals).tolist()
    return dict(loss=loss_sum / max(count, 1), images=int(count), time=elapsed,
                img_per_sec=count / max(elapsed, 1e-9), lr=lr, interrupted=interrupted, skipped_steps=skipped,
                skipped_images=int(skipped_images))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: Optional[str] = None,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent), images and img/s over ``loader``.

    Sums stay on the device (no host synchronisation per batch) and are reduced across processes in one
    all-reduce at the end, so with an :class:`rednet.data.EvalSampler` every image counts exactly once.
    ``skipped_images``: unreadable images the loader left out (``data.bad_images=skip``).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    skipped_images = 0  # host count: the loader's CPU tensors are read without waiting for the device
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc='eval', dynamic_ncols=True, mininterval=1.0, leave=False)
    start = time.perf_counter()
    for batch in it:
        images, target, skipped = _unpack(batch)
        images, target = _to_device(images, target, device, channels_last)
        with autocast(device, amp):
            output = model(images)
        output = output.float()
        sums[0] += F.cross_entropy(output, target, reduction='sum')
        sums[1:3] += _hits(output, target, (1, 5))
        sums[3] += images.shape[0]
        if skipped is not None:
            skipped_images += int(skipped)
    elapsed = time.perf_counter() - start
    world = dist.get_world_size() if _dist_on() else 1
    sums = torch.cat([sums, torch.tensor([skipped_images, elapsed], dtype=torch.float64, device=device)])
    loss_sum, top1, top5, count, skipped, elapsed = reduce_tensor_sum(sums).tolist()
    elapsed /= world  # mean time of the processes, which ran in parallel
    n = max(count, 1)
    return dict(loss=loss_sum / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, images=int(count),
                img_per_sec=count / max(elapsed, 1e-9), time=elapsed, skipped_images=int(skipped))
