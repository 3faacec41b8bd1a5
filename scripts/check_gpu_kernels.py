"""Compile every Triton involution kernel for real GPUs, without a GPU, and report its resources.

For each kernel (forward, grad-input, grad-weight) x dtype (float32, bfloat16, float16) x K (3, 7) x stride
(1, 2) x autotune config (``rednet.ops._triton_impl.CONFIGS``) x architecture (sm_80, sm_90), Triton's own
compiler builds the cubin ahead of time (``triton.compile`` with a ``GPUTarget``, using the ``ptxas`` bundled in
the triton wheel) and the bundled ``cuobjdump -res-usage`` reads its registers, stack (spill) bytes and shared
memory. One line per build; exits 1 on any compile error or any spill (stack > 0).

    python scripts/check_gpu_kernels.py                 # everything (a few minutes)
    python scripts/check_gpu_kernels.py --quick         # K=7, stride 2, float32 + bfloat16, first config, sm_90
    python scripts/check_gpu_kernels.py --arch 90 --kernel fwd --dtype bfloat16 -j 2
"""
import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ('fwd', 'bwd_x', 'bwd_w')
DTYPES = ('float32', 'bfloat16', 'float16')
ARCHS = (80, 90)
TRITON_DTYPE = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}
# RedNet's group width (16 channels per group: one channel block)
GROUP_CHANNELS = 16


def _signature(kernel: str, dtype: str):
    """Triton signature and constexprs of a kernel: three pointers, then int32 sizes and int64 strides."""
    from rednet.ops import _triton_impl as impl
    fn = getattr(impl, f'_{kernel}_kernel')
    from triton.runtime import JITFunction
    while not isinstance(fn, JITFunction):  # the autotuner wraps the JIT function
        fn = fn.fn
    names = fn.arg_names
    ptr = '*' + TRITON_DTYPE[dtype]
    sig = {}
    for i, name in enumerate(names):
        if i < 3:
            sig[name] = ptr
        elif name in ('H', 'W', 'HO', 'WO', 'G', 'CG'):
            sig[name] = 'i32'
        elif name.startswith('s'):
            sig[name] = 'i64'
        else:
            sig[name] = 'constexpr'
    return fn, sig


def _res_usage(cubin: bytes) -> dict:
    import triton
    tool = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
    with tempfile.NamedTemporaryFile(suffix='.cubin', delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([str(tool), '-res-usage', path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ('REG', 'STACK', 'SHARED', 'LOCAL'):
        m = re.search(rf'\b{key}:(\d+)', text)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def build(case):
    """Compile one (kernel, dtype, K, stride, (BLOCK_P, num_warps), arch); returns (case, usage or error)."""
    kernel, dtype, k, stride, (block_p, warps), arch = case
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.language as tl
        fn, sig = _signature(kernel, dtype)
        constexprs = dict(K=k, STRIDE=stride, PAD=(k - 1) // 2, DIL=1, BLOCK_C=GROUP_CHANNELS, BLOCK_P=block_p,
                          ACC=tl.float32)
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget('cuda', arch, 32), options=dict(num_warps=warps))
        return case, _res_usage(compiled.asm['cubin'])
    except Exception as e:  # report, do not stop the sweep
        return case, f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}'[:300]


def cases(args):
    from rednet.ops._triton_impl import CONFIGS
    configs = CONFIGS[:1] if args.quick else CONFIGS
    return list(itertools.product(args.kernel, args.dtype, args.k, args.stride, configs, args.arch))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--kernel', nargs='+', default=list(KERNELS), choices=KERNELS)
    p.add_argument('--dtype', nargs='+', default=list(DTYPES), choices=DTYPES)
    p.add_argument('--k', nargs='+', type=int, default=[3, 7])
    p.add_argument('--stride', nargs='+', type=int, default=[1, 2])
    p.add_argument('--arch', nargs='+', type=int, default=list(ARCHS))
    p.add_argument('--quick', action='store_true', help='K=7, stride 2, float32 + bfloat16, the first config, sm_90')
    p.add_argument('-j', '--jobs', type=int, default=1, help='compile in this many processes')
    args = p.parse_args(argv)
    if args.quick:
        args.k, args.stride, args.dtype, args.arch = [7], [2], ['float32', 'bfloat16'], [90]
    todo = cases(args)
    failures = 0
    print(f'{"kernel":7} {"dtype":8} {"K":>2} {"s":>2} {"BLOCK_P":>7} {"warps":>5} {"arch":>6} {"regs":>5} '
          f'{"stack":>6} {"smem":>6}', flush=True)
    pool = concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    results = pool.map(build, todo) if pool else map(build, todo)
    for (kernel, dtype, k, stride, (block_p, warps), arch), usage in results:
        head = f'{kernel:7} {dtype:8} {k:>2} {stride:>2} {block_p:>7} {warps:>5} {"sm_" + str(arch):>6}'
        if isinstance(usage, str):
            failures += 1
            print(f'{head} COMPILE ERROR {usage}', flush=True)
            continue
        spill = usage['STACK'] > 0 or usage['LOCAL'] > 0
        failures += spill
        print(f'{head} {usage["REG"]:>5} {usage["STACK"]:>6} {usage["SHARED"]:>6}'
              f'{"  SPILL" if spill else ""}', flush=True)
    if pool:
        pool.shutdown()
    print(f'{len(todo)} builds, {failures} failed (compile error or spill)')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
