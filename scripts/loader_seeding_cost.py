"""What per-sample seeding (rednet.data.LoaderSamples: each training sample seeds torch, random and NumPy from
(seed, epoch, index)) costs the data loader, on the ImageNet pipeline and on the in-memory data sets.

    python scripts/loader_seeding_cost.py            # prints a table; see docs/training.md

Timed in one process (the work of one loader worker), alternating seeded and unseeded passes over the same
samples, best of several rounds; the cost is the seeding call's time over the unseeded time per sample.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rednet import data as rdata  # noqa: E402


class Unseeded(rdata.LoaderSamples):
    """The same loading path without the seeding call."""

    def __getitem__(self, key):
        return self.dataset[key[1]]


def _jpeg_folder(root: Path, n: int) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / 'train' / f'c{i % 4}'
        d.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(375, 500, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f'{i}.jpg', quality=90)  # ImageNet's typical 500x375 JPEG
    return root


def _per_sample(samples, keys) -> float:
    start = time.perf_counter()
    for k in keys:
        samples[k]
    return (time.perf_counter() - start) / len(keys)


def _interleaved(a, b, keys, rounds: int):
    """Best time per sample of ``a`` and of ``b``, their passes alternating (load changes hit both alike)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(_per_sample(a, keys))
        tb.append(_per_sample(b, keys))
    return min(ta), min(tb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--rounds', type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    worker = torch.utils.data.get_worker_info
    torch.utils.data.get_worker_info = lambda: object()  # time as a loader worker does (no RNG save/restore)
    with tempfile.TemporaryDirectory() as tmp:
        root = _jpeg_folder(Path(tmp), args.images)
        cases = {
            'imagenet (JPEG 500x375, RandomResizedCrop 224 + flip)':
                rdata.build_dataset(dict(name='imagefolder', root=str(root), train_split='train', img_size=224,
                                         scale=[0.08, 1.0], ratio=[0.75, 4 / 3], hflip=0.5, crop_pct=0.875,
                                         mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), True),
            'digits (12x12 tensors, padded crop)':
                rdata.build_dataset(dict(name='digits', img_size=12, train_crop='pad', crop_padding=1, hflip=0.0,
                                         mean=[0.5] * 3, std=[0.5] * 3), True),
        }
        print('| data set | per sample, unseeded | seeding call | cost |')
        print('|---|---|---|---|')
        for name, ds in cases.items():
            keys = [(0, i % len(ds)) for i in range(args.images)]
            seeded, plain = rdata.LoaderSamples(ds, 0, True), Unseeded(ds, 0, True)
            t_plain, t_seeded = _interleaved(plain, seeded, keys, args.rounds)
            t_seed = _time_seed(keys * 10, args.rounds)
            print(f'| {name} | {t_plain * 1e6:.1f} us | {t_seed * 1e6:.2f} us | {100 * t_seed / t_plain:.2f}% '
                  f'(seeded pass {100 * (t_seeded / t_plain - 1):+.1f}%) |')
    torch.utils.data.get_worker_info = worker


def _time_seed(keys, rounds: int) -> float:
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        for epoch, i in keys:
            rdata.seed_sample(rdata.sample_seed(0, epoch, i))
        best = min(best, (time.perf_counter() - start) / len(keys))
    return best


if __name__ == '__main__':
    main()
