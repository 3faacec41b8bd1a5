"""Triton kernels against the reference, run on the CPU by the Triton interpreter.

``TRITON_INTERPRET=1`` has to be set before Triton is imported, so the kernels run in a child process (one for
the whole module) that prints one JSON line per case; the tests below check those results. The rest of the
test session never sees the variable.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip('triton')

# (name, (N, C, H, W, G, K, stride, dilation, padding or None), dtype, layout)
CASES = [
    ('k3_s1_odd', (2, 8, 7, 9, 2, 3, 1, 1, None), 'float32', 'contiguous'),
    ('k7_s2_odd', (2, 8, 13, 11, 4, 7, 2, 1, None), 'float32', 'contiguous'),
    ('k7_s2_even', (1, 32, 12, 10, 2, 7, 2, 1, None), 'float32', 'contiguous'),
    ('k5_s2_g1', (1, 16, 9, 8, 1, 5, 2, 1, None), 'float32', 'contiguous'),
    ('k3_s2_pad0', (1, 4, 8, 8, 1, 3, 2, 1, 0), 'float32', 'contiguous'),
    ('k5_d2', (2, 6, 10, 8, 3, 5, 1, 2, None), 'float32', 'contiguous'),
    ('k3_s2_d2', (1, 8, 11, 9, 2, 3, 2, 2, None), 'float32', 'contiguous'),
    ('k3_s3', (1, 4, 10, 7, 2, 3, 3, 1, 1), 'float32', 'contiguous'),
    ('cg_not_pow2', (2, 12, 7, 6, 2, 3, 1, 1, None), 'float32', 'contiguous'),
    ('k7_s2_channels_last', (2, 32, 13, 11, 2, 7, 2, 1, None), 'float32', 'channels_last'),
    ('k3_noncontiguous', (2, 8, 9, 7, 2, 3, 2, 1, None), 'float32', 'noncontiguous'),
    ('k7_s2_float64', (1, 16, 11, 13, 1, 7, 2, 1, None), 'float64', 'contiguous'),
    ('k7_s1_float16', (1, 32, 9, 9, 2, 7, 1, 1, None), 'float16', 'contiguous'),
    ('k7_s2_bfloat16', (1, 32, 9, 9, 2, 7, 2, 1, None), 'bfloat16', 'contiguous'),
]

# relative (to the largest magnitude) error allowed per dtype
TOL = {'float32': 1e-5, 'float64': 1e-12, 'float16': 4e-3, 'bfloat16': 3e-2}

_CHILD = textwrap.dedent('''
    import json, os, sys
    assert os.environ.get('TRITON_INTERPRET') == '1'
    import torch
    from rednet.ops import involution, output_size
    from rednet.ops.library import involution_triton

    for name, (n, c, h, w, g, k, s, d, p), dtype, layout in json.loads(sys.argv[1]):
        p = d * (k - 1) // 2 if p is None else p
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(len(name))
        ho, wo = output_size(h, k, s, p, d), output_size(w, k, s, p, d)
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
        wt = torch.randn(n, g, k, k, ho, wo, generator=gen, dtype=torch.float64)
        go = torch.randn(n, c, ho, wo, generator=gen, dtype=torch.float64)
        x, wt, go = x.to(dt), wt.to(dt), go.to(dt)  # round once, then compare against float64 math on those values
        xr = x.double().requires_grad_(True)
        wr = wt.double().requires_grad_(True)
        ref = involution(xr, wr, s, p, d, backend='reference')
        rgx, rgw = torch.autograd.grad(ref, (xr, wr), go.double())
        xt = x.clone().requires_grad_(True)
        wtt = wt.clone().requires_grad_(True)
        xin, win, gin = xt, wtt, go
        if layout == 'channels_last':
            xin = xt.to(memory_format=torch.channels_last)
            gin = go.to(memory_format=torch.channels_last)
        elif layout == 'noncontiguous':
            xin = xt.transpose(2, 3).contiguous().transpose(2, 3)
            win = wtt.permute(0, 1, 3, 2, 4, 5).contiguous().permute(0, 1, 3, 2, 4, 5)
            gin = go.transpose(2, 3).contiguous().transpose(2, 3)
        # public entry point with backend='triton' ...
        out = involution(xin, win, s, p, d, backend='triton')
        gx, gw = torch.autograd.grad(out, (xt, wtt), gin)
        # ... and the kernels called directly (so a silent fallback could not pass)
        out_direct = involution_triton(xin.detach(), win.detach(), s, p, d)
        errs = {}
        for key, a, b in (('out', out, ref), ('grad_x', gx, rgx), ('grad_weight', gw, rgw),
                          ('out_direct', out_direct, ref)):
            errs[key] = None if a.shape != b.shape else \\
                float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
        errs['dtypes'] = [str(t.dtype).replace('torch.', '') for t in (out, gx, gw)]
        print('RESULT ' + json.dumps({'name': name, 'errs': errs}), flush=True)
''')


@pytest.fixture(scope='module')
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET='1')
    root = Path(__file__).resolve().parents[1]
    env['PYTHONPATH'] = str(root) + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(CASES)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            r = json.loads(line[len('RESULT '):])
            results[r['name']] = r['errs']
    return results


@pytest.mark.parametrize('name,shape,dtype,layout', CASES, ids=[c[0] for c in CASES])
def test_triton_kernels_match_reference(interpreter_results, name, shape, dtype, layout):
    assert name in interpreter_results, 'case did not run'
    errs = interpreter_results[name]
    assert errs['dtypes'] == [dtype] * 3
    for key in ('out', 'grad_x', 'grad_weight', 'out_direct'):
        assert errs[key] is not None, f'{key}: wrong shape'
        assert errs[key] < TOL[dtype], f'{key}: relative error {errs[key]:.3g} (tolerance {TOL[dtype]})'
