"""scripts/check_gpu_kernels.py: the Triton kernels compile for a real GPU (sm_90) without one and do not spill."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip('triton')

_PATH = Path(__file__).resolve().parents[1] / 'scripts' / 'check_gpu_kernels.py'


def _script():
    spec = importlib.util.spec_from_file_location('check_gpu_kernels', _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_subset_compiles_for_sm90_without_spills(capsys):
    # K=7, stride 2, float32 + bfloat16, the first autotune config, every kernel: the case that spilled before
    rc = _script().main(['--quick'])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if 'sm_90' in line]
    assert len(rows) == 6, out
    assert rc == 0, out
    for row in rows:
        regs, stack = int(row.split()[7]), int(row.split()[8])
        assert 0 < regs <= 255 and stack == 0, row


def test_a_spill_or_a_compile_error_fails_the_check(monkeypatch, capsys):
    mod = _script()
    results = iter([{'REG': 255, 'STACK': 424, 'SHARED': 0, 'LOCAL': 0}, 'CompilationError: boom',
                    {'REG': 96, 'STACK': 0, 'SHARED': 0, 'LOCAL': 0}])
    monkeypatch.setattr(mod, 'build', lambda case: (case, next(results)))
    monkeypatch.setattr(mod, 'cases', lambda args: [('fwd', 'float32', 7, 1, (64, 4), arch) for arch in (80, 90, 100)])
    rc = mod.main([])
    out = capsys.readouterr().out
    assert rc == 1
    assert 'SPILL' in out and 'COMPILE ERROR CompilationError: boom' in out
    assert out.strip().endswith('3 builds, 2 failed (compile error or spill)')
