"""Compare training runs: one summary table (Markdown and CSV) and the val top-1 / train loss curves.

    python scripts/compare_runs.py multirun/digits-kernel-size --out compare/kernel-size     # a Hydra sweep
    python scripts/compare_runs.py outputs/digits-rednet26/RUN outputs/digits-resnet26/RUN --out compare/r26

Each DIR is a run directory of ``train.py`` (it holds ``metrics.jsonl``) or any directory above run directories,
such as a Hydra sweep directory (``python train.py -m ...`` writes one job directory per value in it). Writes:

- ``OUT/summary.md`` and ``OUT/summary.csv``: one row per run with the settings that differ between the runs,
  parameters, epochs, best and final val top-1 / top-5, training img/s (mean over epochs) and wall time
  (training plus validation, summed over epochs; start-up excluded);
- ``OUT/curves.png``: val top-1 and train loss against epoch, one line per run, labelled by those settings.

The settings of a run are its command-line overrides (``.hydra/overrides.yaml``); where a key is overridden in
one run but not in another, the other run's value comes from its composed config (``.hydra/config.yaml``, or
the config stored in its checkpoint) or its config-group choice (``.hydra/hydra.yaml``). Runs without Hydra's
files (``train.train(cfg, run_dir)``) are compared on their whole stored config. Parameters come from the
run's ``checkpoints/last.pt`` (its weights, without BatchNorm statistics).
"""
import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
COLUMNS = (('params', 'params'), ('epochs', 'epochs'), ('best_top1', 'best top-1 (%)'),
           ('final_top1', 'final top-1 (%)'), ('best_top5', 'best top-5 (%)'), ('final_top5', 'final top-5 (%)'),
           ('img_per_sec', 'img/s'), ('wall_time_s', 'wall time (s)'))


def find_runs(dirs: List[str]) -> List[Path]:
    """Run directories (with metrics.jsonl) given directly or found below the given directories."""
    runs: List[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SystemExit(f'error: {d} is not a directory')
        found = [d] if (d / 'metrics.jsonl').is_file() else sorted(
            (p.parent for p in d.rglob('metrics.jsonl')),
            key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(d).parts])
        if not found:
            raise SystemExit(f'error: no run directory (one holding metrics.jsonl, written by train.py) in {d}')
        runs += [r for r in found if r not in runs]
    return runs


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _flatten(cfg: Any, prefix: str = '') -> Dict[str, str]:
    if not isinstance(cfg, dict):
        return {prefix[:-1]: _fmt(cfg)}
    out: Dict[str, str] = {}
    for key, value in cfg.items():
        out.update(_flatten(value, f'{prefix}{key}.'))
    return out


def _read_checkpoint(run: Path) -> Dict[str, Any]:
    path = run / 'checkpoints' / 'last.pt'
    if not path.is_file():
        return {}
    import torch
    return torch.load(path, map_location='cpu', weights_only=True, mmap=True)


def read_run(run: Path) -> Dict[str, Any]:
    """Metrics, settings (overrides and composed config, flattened) and parameter count of one run."""
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    ckpt = _read_checkpoint(run)
    overrides = _yaml(run / '.hydra' / 'overrides.yaml')
    config = _yaml(run / '.hydra' / 'config.yaml') or ckpt.get('config') or {}
    choices = ((_yaml(run / '.hydra' / 'hydra.yaml') or {}).get('hydra', {}).get('runtime', {})
               .get('choices', {}))
    settings = {}
    for item in overrides or []:
        key, _, value = item.partition('=')
        if not key.lstrip('+~').startswith('hydra.'):
            settings[key.lstrip('+~')] = _fmt(yaml.safe_load(value) if value else None)
    state = ckpt.get('model') or {}
    params = sum(v.numel() for k, v in state.items() if not k.endswith(BUFFERS)) if state else None
    return dict(path=run, metrics=metrics, overrides=settings, has_overrides=overrides is not None,
                config={**_flatten(config), **{k: _fmt(v) for k, v in choices.items()}}, params=params)


def differing_settings(runs: List[Dict[str, Any]]) -> List[str]:
    """Keys whose value differs between the runs: overridden keys, or every config key for runs without Hydra's
    record of their overrides."""
    keys = {k: None for r in runs for k in r['overrides']}
    if not all(r['has_overrides'] for r in runs):
        keys.update({k: None for r in runs for k in r['config']})
    return [k for k in keys if len({setting(r, k) for r in runs}) > 1]


def setting(run: Dict[str, Any], key: str) -> str:
    """A run's value of ``key``: its override, else its composed config's value (or group choice)."""
    if key in run['overrides']:
        return run['overrides'][key]
    return run['config'].get(key, '-')


def summarize(run: Dict[str, Any]) -> Dict[str, Any]:
    m = run['metrics']
    val = [e for e in m if e.get('val_top1') is not None]
    val_time = sum(e['val_images'] / e['val_img_per_sec'] for e in val
                   if e.get('val_images') and e.get('val_img_per_sec'))
    return dict(
        params=run['params'], epochs=len(m),
        best_top1=max((e['val_top1'] for e in val), default=None),
        final_top1=val[-1]['val_top1'] if val else None,
        best_top5=max((e['val_top5'] for e in val), default=None),
        final_top5=val[-1]['val_top5'] if val else None,
        img_per_sec=sum(e['img_per_sec'] for e in m) / len(m) if m else None,
        wall_time_s=sum(e['epoch_time'] for e in m) + val_time if m else None)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return '-'
    if key == 'params':
        return f'{value:,}'
    return f'{value:.2f}' if key.endswith(('top1', 'top5')) else f'{value:.1f}' if isinstance(value, float) \
        else str(value)


def label(run: Dict[str, Any], keys: List[str]) -> str:
    return ' '.join(f'{k}={setting(run, k)}' for k in keys) or str(run['path'])


def write_tables(runs: List[Dict[str, Any]], keys: List[str], out: Path) -> None:
    rows = [summarize(r) for r in runs]
    header = ['run', *keys, *(title for _, title in COLUMNS)]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for run, row in zip(runs, rows):
        cells = [str(run['path']), *(setting(run, k) for k in keys), *(_cell(k, row[k]) for k, _ in COLUMNS)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    (out / 'summary.md').write_text('\n'.join(lines) + '\n')
    with open(out / 'summary.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['run', *keys, *(k for k, _ in COLUMNS)])
        for run, row in zip(runs, rows):
            writer.writerow([run['path'], *(setting(run, k) for k in keys), *('' if row[k] is None else row[k]
                                                                              for k, _ in COLUMNS)])


def plot_curves(runs: List[Dict[str, Any]], keys: List[str], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (top1, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        m = run['metrics']
        val = [e for e in m if e.get('val_top1') is not None]
        top1.plot([e['epoch'] + 1 for e in val], [e['val_top1'] for e in val], marker='o', label=label(run, keys))
        loss.plot([e['epoch'] + 1 for e in m], [e['train_loss'] for e in m], marker='o', label=label(run, keys))
    for ax, title in ((top1, 'val top-1 (%)'), (loss, 'train loss')):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel('epoch')
        ax.set_title(title)
        ax.grid(alpha=0.3)
    top1.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('dirs', nargs='+', metavar='DIR', help='run directories and/or sweep directories')
    parser.add_argument('--out', required=True, help='output directory (created)')
    args = parser.parse_args(argv)
    runs = [read_run(p) for p in find_runs(args.dirs)]
    keys = differing_settings(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(runs, keys, out)
    plot_curves(runs, keys, out / 'curves.png')
    print((out / 'summary.md').read_text(), end='')
    print(f'wrote {out / "summary.md"}, {out / "summary.csv"}, {out / "curves.png"} ({len(runs)} runs)',
          file=sys.stderr)


if __name__ == '__main__':
    main()
