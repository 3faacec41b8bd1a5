"""Mutation check of the test suite: break one behaviour at a time in a scratch copy of the repository and run
the tests that should notice. Every mutant must be caught.

    python scripts/mutants.py                 # all mutants (``make mutants``), a markdown table on stdout
    python scripts/mutants.py --list          # names only
    python scripts/mutants.py clip ema        # the mutants whose name contains one of these words
    python scripts/mutants.py --no-baseline   # skip the run of the selected tests on the unmutated copy

Each mutant replaces one exact snippet of one file. A snippet that is no longer in its file (or is there more than
once) is reported as STALE and fails the run: update the list when the code moves. Exit status: 0 when every
mutant was caught, 1 otherwise.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns('.git', '.venv', 'venv', '.torch_ext', '__pycache__', '.pytest_cache', 'outputs',
                                'multirun', '*.egg-info', 'docs')


class Mutant(NamedTuple):
    name: str
    file: str
    original: str
    replacement: str
    tests: List[str]


T_TRAIN = 'tests/test_train.py'
T_RECIPE = 'tests/test_train_recipe.py'
T_RESUME = 'tests/test_train_resume.py'
STEPS = f'{T_RECIPE}::test_every_weight_moves_and_clipping_bounds_the_step'
RESUME_EPOCH = f'{T_RESUME}::test_resume_is_bit_exact[workers0-epoch-boundary]'
RESUME_MID = f'{T_RESUME}::test_resume_is_bit_exact[workers0-mid-epoch]'
DDP = 'tests/test_ddp.py::test_ddp_two_processes_gloo'

MUTANTS = [
    # the eight of issue 14
    Mutant('engine: optimizer.step() skipped', 'rednet/engine.py',
           '        optimizer.step()\n', '        pass\n', [STEPS]),
    Mutant('train.py: no DDP wrapper (ranks never average gradients)', 'train.py',
           'wrapped = nn.parallel.DistributedDataParallel(\n',
           'wrapped = (lambda module, **kwargs: module)(\n', [DDP]),
    Mutant('train.py: RNG state not restored on resume', 'train.py',
           '        engine.restore_rng_state(rng)', '        pass', [RESUME_EPOCH]),
    Mutant('checkpoint: unpickler admits every numpy global', 'rednet/weights.py',
           'if (module, name) not in self._ALLOWED:',
           "if (module, name) not in self._ALLOWED and not module.startswith('numpy'):",
           ['tests/test_checkpoint.py::test_malicious_pickle_is_refused_and_never_runs[numpy.runstring-.pdparams]']),
    Mutant('native: half precision accumulated in half precision', 'rednet/ops/_common.py',
           'return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype', 'return dtype',
           ['tests/test_ops.py::test_fast_low_precision[dtype1-native]']),
    Mutant('eval.py: class_map checked but not applied', 'eval.py',
           'return RemappedTargets(dataset, mapping)', 'return dataset',
           ['tests/test_eval.py::test_class_count_mismatch_and_class_map']),
    Mutant('engine: gradient clipping ignored', 'rednet/engine.py',
           'dispatch_clip_grad(model.parameters(), setup.clip_grad, mode=setup.clip_mode)', 'pass', [STEPS]),
    Mutant('native: never-read input pixels not zeroed in grad_x', 'rednet/ops/_common.py',
           '    if not geo.covers_input:\n        gxc.zero_()', '    if False:\n        gxc.zero_()',
           ['tests/test_ops.py::test_fast_matches_reference_float64[n1c4_7x7_g1_k3_s3_d1_p0-native]',
            'tests/test_ops.py::test_fast_matches_reference_float64[n2c4_9x11_g2_k3_s4_d1_p0-native]']),
    # ops
    Mutant('native: the forward drops the second tap', 'rednet/ops/native.py',
           '        for t in range(1, kk):\n            oq.addcmul_(xv[t], wv[t])',
           '        for t in range(2, kk):\n            oq.addcmul_(xv[t], wv[t])',
           ['tests/test_ops.py::test_fast_matches_reference_float64[n2c8_7x9_g2_k3_s1_d1-native]']),
    Mutant('cpp: the kernel-map gradient computed only when the input needs one', 'rednet/ops/cpp.py',
           'dilation, need_x, need_w)', 'dilation, need_x, need_x)',
           ['tests/test_ops.py::test_fast_only_one_input_requires_grad[cpp]']),
    # engine
    Mutant('engine: warmup starts from (1 - warmup_ratio)', 'rednet/engine.py',
           '(1 - it / self.warmup_iters) * (1 - self.warmup_ratio)', '(1 - it / self.warmup_iters) * self.warmup_ratio',
           [f'{T_RECIPE}::test_warmup_cosine_schedule_follows_its_formula']),
    Mutant('engine: half a cosine period', 'rednet/engine.py',
           '0.5 * (1 + math.cos(math.pi * progress))', '0.5 * (1 + math.cos(math.pi * progress / 2))',
           [f'{T_RECIPE}::test_warmup_cosine_schedule_follows_its_formula']),
    Mutant('engine: EMA never updated', 'rednet/engine.py',
           'setup.ema.update(timm.utils.unwrap_model(model), step=step)', 'pass',
           [f'{T_RECIPE}::test_ema_follows_its_formula']),
    Mutant('engine: evaluation loss averaged per batch', 'rednet/engine.py',
           "F.cross_entropy(output, target, reduction='sum')", "F.cross_entropy(output, target, reduction='mean')",
           [f'{T_TRAIN}::test_evaluate_under_bf16_autocast']),
    Mutant('engine: top-5 counts only the top-1', 'rednet/engine.py',
           'hits[:, :min(k, maxk)]', 'hits[:, :1]',
           ['tests/test_eval.py::test_eval_our_training_checkpoint_on_digits']),
    Mutant('engine: metrics not summed across processes', 'rednet/engine.py',
           'reduce_tensor_sum(sums).tolist()', 'sums.tolist()', [DDP]),
    # train.py
    Mutant('train.py: label smoothing dropped', 'train.py',
           'return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None', 'return nn.CrossEntropyLoss(), None',
           [f'{T_RECIPE}::test_label_smoothing_follows_its_formula']),
    Mutant('train.py: optimizer state not restored on resume', 'train.py',
           "    optimizer.load_state_dict(ckpt['optimizer'])", '    pass', [RESUME_EPOCH]),
    Mutant('train.py: EMA restarted from the weights on resume', 'train.py',
           "ema.module.load_state_dict(ckpt['ema'])", 'ema.module.load_state_dict(model.state_dict())',
           [RESUME_EPOCH]),
    Mutant('train.py: mid-epoch resume repeats the epoch\'s first batches', 'train.py',
           'skip=progress.batches_done * cfg.train.batch_size)', 'skip=0)', [RESUME_MID]),
    # data
    Mutant('data: the same shuffle every epoch', 'rednet/data.py',
           'manual_seed(self.seed * 100003 + self.epoch)', 'manual_seed(self.seed * 100003)',
           ['tests/test_data.py::test_train_sampler_is_a_function_of_seed_and_epoch']),
    Mutant('data: every process evaluates the first shard', 'rednet/data.py',
           'list(range(rank, dataset_len, num_replicas))', 'list(range(0, dataset_len, num_replicas))',
           ['tests/test_data.py::test_train_sampler_is_a_function_of_seed_and_epoch']),
    Mutant('data: the CIFAR crop pads one pixel more than crop_padding', 'rednet/data.py',
           'T.RandomCrop(img_size, padding=padding)', 'T.RandomCrop(img_size, padding=padding + 1)',
           ['tests/test_data.py::test_pad_crop_is_a_window_of_the_zero_padded_image']),
    # checkpoint
    Mutant('checkpoint: Paddle classifier not transposed', 'rednet/weights.py',
           'value = value.t().contiguous()  # Paddle', 'value = value.contiguous()  # Paddle',
           ['tests/test_checkpoint.py::test_paddle_file_gives_official_logits[2-False]']),
    Mutant('checkpoint: head of another class count kept', 'rednet/weights.py',
           'if fc is None or fc.shape[0] != model.num_classes:', 'if fc is None:',
           ['tests/test_checkpoint.py::test_new_head_override_keeps_backbone']),
    # model
    Mutant('model: gradient checkpointing does nothing', 'rednet/model.py',
           'return checkpoint_seq(nn.Sequential(self.layer1,', 'return (lambda seq, x: seq(x))(nn.Sequential(self.layer1,',
           ['tests/test_model.py::test_grad_checkpointing_gives_same_gradients']),
    # eval.py
    Mutant("eval.py: the checkpoint's mean/std ignored", 'eval.py',
           "interpolation=pc['interpolation'], mean=list(pc['mean']), std=list(pc['std']))",
           "interpolation=pc['interpolation'])",
           ['tests/test_eval.py::test_eval_uses_the_checkpoints_own_transform']),
]


class Result(NamedTuple):
    mutant: Mutant
    status: str  # caught | NOT CAUGHT | STALE (snippet not found) | STALE (snippet not unique)
    by: str
    seconds: float


def _copy_repo() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix='rednet-mutants-'))
    dst = scratch / 'repo'
    shutil.copytree(REPO, dst, ignore=IGNORE, symlinks=True)
    return dst


def _pytest(root: Path, tests: List[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    env.setdefault('TORCH_EXTENSIONS_DIR', str(REPO / '.torch_ext'))  # reuse the C++ build: same sources
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-rf', '-p', 'no:cacheprovider', *tests]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def _failed_test(output: str) -> str:
    m = re.search(r'^(?:FAILED|ERROR) (\S+)', output, re.M)
    if m:
        return m.group(1).split('/')[-1]
    return 'pytest exited with an error: ' + (output.strip().splitlines() or ['?'])[-1][:80]


def _check(m: Mutant) -> Optional[str]:
    text = (REPO / m.file).read_text()
    count = text.count(m.original)
    if count == 0:
        return 'STALE (snippet not found)'
    if count > 1:
        return 'STALE (snippet not unique)'
    return None


def run_mutant(root: Path, m: Mutant) -> Result:
    start = time.perf_counter()
    stale = _check(m)
    if stale:
        return Result(m, stale, '', 0.0)
    path = root / m.file
    original = path.read_text()
    path.write_text(original.replace(m.original, m.replacement))
    try:
        r = _pytest(root, m.tests)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    if r.returncode == 0:
        return Result(m, 'NOT CAUGHT', '', seconds)
    return Result(m, 'caught', _failed_test(r.stdout + r.stderr), seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', help='run only mutants whose name contains one of these words')
    parser.add_argument('--list', action='store_true', help='list the mutants and exit')
    parser.add_argument('--no-baseline', action='store_true',
                        help='do not first check that the selected tests pass on the unmutated copy')
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.names or any(w.lower() in m.name.lower() for w in args.names)]
    if args.list:
        print('\n'.join(f'{m.name}  ({m.file}; {", ".join(m.tests)})' for m in mutants))
        return 0
    start = time.perf_counter()
    root = _copy_repo()
    try:
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            r = _pytest(root, tests)
            if r.returncode != 0:
                print(f'the unmutated tests fail, so no mutant can be judged:\n{r.stdout[-3000:]}{r.stderr[-2000:]}')
                return 1
            print(f'baseline: the {len(tests)} selected tests pass on the unmutated copy '
                  f'({time.perf_counter() - start:.0f}s)\n')
        results = []
        for m in mutants:
            results.append(run_mutant(root, m))
            print(f'  {results[-1].status:<10} {m.name} ({results[-1].seconds:.0f}s)', file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
    print('| mutant | file | result | caught by | time |')
    print('|---|---|---|---|---|')
    for r in results:
        print(f'| {r.mutant.name} | `{r.mutant.file}` | {r.status} | {r.by} | {r.seconds:.0f}s |')
    caught = sum(r.status == 'caught' for r in results)
    print(f'\n{caught} of {len(results)} mutants caught in {time.perf_counter() - start:.0f}s')
    return 0 if caught == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
