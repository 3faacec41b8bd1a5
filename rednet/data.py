"""Data sets, transforms and loaders for ``train.py`` (and ``eval.py``).

Data sets (``data.name``):
- ``imagenet`` / ``imagefolder``: class folders ``<root>/<split>/<class>/<image>`` through torchvision's
  ``ImageFolder``, every image converted to RGB (grayscale, palette, RGBA, CMYK ...); an unreadable image is a
  clear error naming the file, or with ``data.bad_images=skip`` a warning with a running count;
- ``cifar10`` / ``cifar100``: torchvision, downloaded when allowed and possible, otherwise an error saying
  where to put the files;
- ``digits``: scikit-learn's 8x8 digits, a fixed stratified split, upsampled to ``data.img_size``;
- ``synthetic``: random images with a class-dependent pattern, generated in memory from a fixed seed.

Transforms come from timm's ``create_transform`` (RandomResizedCrop + flip for training, resize + centre crop
for evaluation), or a padded random crop for the 32x32 data sets. Samplers are deterministic functions of
(seed, epoch) and each training sample seeds its own augmentation from (seed, epoch, index), so a resumed run
sees exactly the batches an uninterrupted run would, with any number of loader workers.
"""
import math
import os
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ['DataError', 'BadImageError', 'load_rgb', 'ImageFolderRGB', 'DigitsDataset', 'SyntheticDataset',
           'build_transform', 'build_dataset', 'TrainSampler', 'EvalSampler', 'LoaderSamples', 'collate_skips',
           'sample_seed', 'build_loader', 'DATASETS']

DATASETS = ('imagenet', 'imagefolder', 'cifar10', 'cifar100', 'digits', 'synthetic')
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.gif')


class DataError(RuntimeError):
    """A data set that cannot be used as configured (missing root, empty split, missing files)."""


class BadImageError(DataError):
    """An image file that cannot be decoded."""


def _get(cfg: Any, key: str) -> Any:
    """``key`` of a data config: an OmegaConf node, a plain dict (a checkpoint's stored config) or an object. A key
    that ``cfg`` lacks has the schema's default (:class:`rednet.train_config.DataConfig`); an Enum choice is
    read as its value."""
    from enum import Enum
    value = cfg.get(key, _UNSET) if isinstance(cfg, Mapping) else getattr(cfg, key, _UNSET)
    if value is _UNSET:
        from .train_config import DataConfig
        value = getattr(DataConfig(), key)
    return value.value if isinstance(value, Enum) else value


_UNSET = object()


# ---------------------------------------------------------------------------------------------------------
# images from files

def load_rgb(path: str):
    """Open an image and convert it to RGB (L, LA, P, RGBA, CMYK, I;16 ...); errors name the file."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
        raise BadImageError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
    if img.mode == 'RGB':
        return img
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        img = img.point(lambda v: v * (1 / 256)).convert('L')
    return img.convert('RGB')


def _check_split(root: Optional[str], split: str, dataset: str) -> Path:
    if not root:
        raise DataError(f'data={dataset} needs data.root=PATH, a directory holding {split}/<class>/<image>')
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f'data.root={root} does not exist or is not a directory (data={dataset} expects '
                        f'{root}/{split}/<class>/<image>)')
    split_dir = root_path / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        raise DataError(f'split folder {split_dir} does not exist (data={dataset}; folders in {root_path}: '
                        f'{found or "none"})')
    classes = [p for p in split_dir.iterdir() if p.is_dir()]
    if not classes:
        raise DataError(f'split folder {split_dir} is empty: expected one sub-folder per class with images in it')
    if not any(f.lower().endswith(IMG_EXTENSIONS) for c in classes for _, _, fs in os.walk(c, followlinks=True)
               for f in fs):
        raise DataError(f'split folder {split_dir} has class folders but no images '
                        f'(extensions {", ".join(IMG_EXTENSIONS)})')
    return split_dir


class ImageFolderRGB(Dataset):
    """torchvision ``ImageFolder`` reading every image as RGB.

    Args:
        root: the split folder (``<root>/<class>/<image>``).
        transform: applied to the PIL image.
        bad_images: ``'error'`` raises :class:`BadImageError` naming the file; ``'skip'`` warns, counts the file
            (``num_skipped``, per loader process) and returns the next readable sample instead.
        class_to_idx: a fixed class mapping (the training split's, for validation).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, bad_images: str = 'error',
                 class_to_idx: Optional[Dict[str, int]] = None):
        from torchvision.datasets import ImageFolder
        if bad_images not in ('error', 'skip'):
            raise ValueError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        folder = ImageFolder(root, loader=load_rgb, is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS),
                             allow_empty=False)
        if class_to_idx is not None and folder.class_to_idx != class_to_idx:
            missing = sorted(set(folder.class_to_idx) - set(class_to_idx))
            if missing:
                raise DataError(f'{root} has classes that the training split lacks: {missing[:10]}')
            folder.samples = [(p, class_to_idx[folder.classes[t]]) for p, t in folder.samples]
            folder.class_to_idx = class_to_idx
        self.root = root
        self.samples: List[Tuple[str, int]] = folder.samples
        self.targets = [t for _, t in self.samples]
        self.class_to_idx = folder.class_to_idx
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.transform = transform
        self.bad_images = bad_images
        self.num_skipped = 0
        self._skipped_paths = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Optional[Tuple[Any, int]]:
        """Sample ``index``, or None when its image is unreadable and ``bad_images='skip'`` (warned once per file
        and counted in ``num_skipped``)."""
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
        except BadImageError as e:
            if self.bad_images == 'error':
                raise BadImageError(f'{e} (set data.bad_images=skip to skip unreadable images)') from None
            if path not in self._skipped_paths:
                self._skipped_paths.add(path)
                self.num_skipped += 1
                warnings.warn(f'skipping unreadable image {path} ({self.num_skipped} skipped so far by this '
                              f'loader process): {e}')
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __getitem__(self, index: int):
        """Sample ``index``; an unreadable one (``bad_images='skip'``) is replaced by the next readable one."""
        for attempt in range(len(self.samples)):
            sample = self.load((index + attempt) % len(self.samples))
            if sample is not None:
                return sample
        raise DataError(f'no readable image in {self.root}')


# ---------------------------------------------------------------------------------------------------------
# in-memory data sets

class TensorImageDataset(Dataset):
    """Images held as a float tensor (N, C, H, W) in [0, 1], with a tensor transform."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Optional[Callable] = None):
        self.images = images
        self.targets = targets.tolist()
        self.transform = transform
        self.classes = sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class DigitsDataset(TensorImageDataset):
    """scikit-learn's 8x8 digits: a fixed stratified 80/20 split (random_state 0), bilinearly upsampled to
    ``img_size`` and repeated to 3 channels."""

    def __init__(self, train: bool, img_size: int = 16, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
        targets = torch.tensor(digits.target)
        idx_train, idx_val = train_test_split(list(range(len(targets))), test_size=0.2, random_state=0,
                                              stratify=digits.target)
        idx = torch.tensor(idx_train if train else idx_val)
        images = images[idx].unsqueeze(1)
        if img_size != 8:
            images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', align_corners=False)
        super().__init__(images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), targets[idx], transform)


class SyntheticDataset(TensorImageDataset):
    """Random images with a learnable class signal (a per-class colour offset), from a fixed seed."""

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int = 0, in_chans: int = 3,
                 transform: Optional[Callable] = None):
        g = torch.Generator().manual_seed(seed)
        targets = torch.arange(size) % num_classes
        targets = targets[torch.randperm(size, generator=g)]
        offsets = torch.rand(num_classes, in_chans, 1, 1, generator=g)
        noise = torch.rand(size, in_chans, img_size, img_size, generator=g)
        images = (0.5 * noise + 0.5 * offsets[targets]).clamp(0, 1)
        super().__init__(images, targets, transform)


# ---------------------------------------------------------------------------------------------------------
# transforms

def build_transform(cfg: Any, is_training: bool, tensor_input: bool = False) -> Callable:
    """Transform for data config ``cfg`` (see ``configs/data/*.yaml``), from ``timm.data.create_transform``.

    Training is timm's pipeline (crop, flip; auto-augment or colour jitter; to tensor, normalise, random
    erasing) with the crop of ``train_crop``: ``rrc`` timm's RandomResizedCrop (ImageNet), ``pad`` a random crop
    of ``img_size`` from the image zero-padded by ``crop_padding`` pixels on each side (CIFAR; no crop when it is
    0), ``none`` no crop. Evaluation is timm's resize and centre crop. ``tensor_input``: the in-memory data
    sets, whose images are already tensors of the right size; they are only normalised for evaluation, and
    train without auto-augment (PIL images only).
    """
    from timm.data import create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T
    crop, img_size = _get(cfg, 'train_crop'), int(_get(cfg, 'img_size'))
    mean, std = tuple(_get(cfg, 'mean')), tuple(_get(cfg, 'std'))
    if crop not in ('rrc', 'pad', 'none'):
        raise ValueError(f"data.train_crop must be one of rrc, pad, none; got {crop!r}")
    if not is_training and tensor_input:
        return T.Normalize(mean, std)
    stages = create_transform(
        img_size, is_training=is_training, scale=tuple(_get(cfg, 'scale')), ratio=tuple(_get(cfg, 'ratio')),
        hflip=float(_get(cfg, 'hflip')), color_jitter=float(_get(cfg, 'color_jitter')) or None,
        auto_augment=None if tensor_input else _get(cfg, 'auto_augment'), interpolation=_get(cfg, 'interpolation'),
        mean=mean, std=std, re_prob=float(_get(cfg, 're_prob')), crop_pct=float(_get(cfg, 'crop_pct')),
        separate=is_training)
    if not is_training:
        return stages
    primary, secondary, final = stages
    ops = list(primary.transforms)
    if crop != 'rrc':
        ops = [op for op in ops if not isinstance(op, RandomResizedCropAndInterpolation)]
        padding = int(_get(cfg, 'crop_padding'))
        if crop == 'pad' and padding > 0:
            ops.insert(0, T.RandomCrop(img_size, padding=padding))
    return T.Compose(ops + list(secondary.transforms) + list(final.transforms))


# ---------------------------------------------------------------------------------------------------------
# data sets

def _cifar(cfg: Any, train: bool, transform: Callable) -> Dataset:
    from torchvision import datasets
    name = _get(cfg, 'name')
    cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
    root = str(Path(_get(cfg, 'root') or 'data/cifar').expanduser())
    folder = cls.base_folder
    url = cls.url
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError as e:  # not there, or corrupted
        reason = str(e)
    where = (f'download {url} and extract it into {root} so that {os.path.join(root, folder)}/ holds the '
             f'batch files, or set data.root=PATH to where they are')
    if not _get(cfg, 'download'):
        raise DataError(f'{name} not found under {os.path.join(root, folder)} ({reason}) and '
                        f'data.download=false: {where}')
    try:
        return cls(root, train=train, transform=transform, download=True)
    except Exception as e:  # no network, proxy, disk ...
        raise DataError(f'{name} not found under {os.path.join(root, folder)} and the download failed '
                        f'({type(e).__name__}: {e}): {where}') from None


def build_dataset(cfg: Any, train: bool, seed: int = 0, class_to_idx: Optional[Dict[str, int]] = None) -> Dataset:
    """The training or validation data set of data config ``cfg``, with its transform.

    Every returned data set has ``classes`` (for the class count) and ``__len__``.
    """
    name = _get(cfg, 'name')
    if name not in DATASETS:
        raise DataError(f'unknown data set {name!r}; choose one of {", ".join(DATASETS)}')
    if name in ('digits', 'synthetic'):
        transform = build_transform(cfg, train, tensor_input=True)
        if name == 'digits':
            return DigitsDataset(train, int(_get(cfg, 'img_size')), transform)
        size = int(_get(cfg, 'train_size' if train else 'val_size'))
        return SyntheticDataset(size, int(_get(cfg, 'num_classes') or 10), int(_get(cfg, 'img_size')),
                                seed=seed + (0 if train else 1), transform=transform)
    transform = build_transform(cfg, train)
    if name in ('cifar10', 'cifar100'):
        return _cifar(cfg, train, transform)
    split = _get(cfg, 'train_split' if train else 'val_split')
    split_dir = _check_split(_get(cfg, 'root'), split, name)
    return ImageFolderRGB(str(split_dir), transform, _get(cfg, 'bad_images'), class_to_idx)


# ---------------------------------------------------------------------------------------------------------
# samplers and loaders

class TrainSampler(Sampler[int]):
    """Shuffled indices for one of ``num_replicas`` processes, a pure function of (seed, epoch).

    Like ``DistributedSampler`` (pads to equal shards), plus ``skip``: start an epoch after its first samples
    (to resume a run stopped mid-epoch). ``keyed=True`` yields ``(epoch, index)`` pairs for
    :class:`LoaderSamples`, which seeds each sample's augmentation from them.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 keyed: bool = False):
        self.n = dataset_len
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.num_samples = math.ceil(dataset_len / num_replicas)
        self.epoch, self.skip, self.keyed = 0, 0, keyed

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        else:
            indices = list(range(self.n))
        total = self.num_samples * self.num_replicas
        indices += (indices * math.ceil(total / max(self.n, 1)))[:total - len(indices)]
        mine = indices[self.rank:total:self.num_replicas][self.skip:]
        return iter([(self.epoch, i) for i in mine] if self.keyed else mine)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EvalSampler(Sampler[int]):
    """Every index exactly once across processes (no padding), so reduced metrics count each image once."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of one training sample's augmentation: a pure function of (seed, epoch, index)."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2 ** 63


def seed_sample(seed: int) -> None:
    """Seed every RNG a transform may draw from: torch's CPU generator (torchvision), Python's ``random``
    (timm) and NumPy's global one. ``torch.default_generator`` directly: ``torch.manual_seed`` also visits
    every accelerator backend, 40x slower (about 260 us here)."""
    import random
    import numpy as np
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class LoaderSamples(Dataset):
    """What :func:`build_loader` iterates: the samples of ``dataset``.

    - Training (keys ``(epoch, index)`` from a keyed :class:`TrainSampler`): each sample's augmentation
      randomness is seeded from :func:`sample_seed`, so batches depend neither on the number of loader workers
      nor on where a run was interrupted (exact mid-epoch resume with workers).
    - ``data.bad_images=skip`` (``skips``): samples are ``(image, target, skipped)``. Training replaces an
      unreadable image by the next readable one (batch shapes stay fixed) and counts it in ``skipped``;
      evaluation leaves it out (None, which :func:`collate_skips` drops and counts), so no image counts twice.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, train: bool = True):
        self.dataset, self.seed, self.train = dataset, seed, train
        self.skips = getattr(dataset, 'bad_images', 'error') == 'skip' and hasattr(dataset, 'load')

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not self.train:
            if not self.skips:
                return self.dataset[key]
            sample = self.dataset.load(key)
            return None if sample is None else (*sample, 0)
        epoch, index = key
        state = _rng_state() if torch.utils.data.get_worker_info() is None else None
        seed_sample(sample_seed(self.seed, epoch, index))
        try:
            if not self.skips:
                return self.dataset[index]
            for skipped in range(len(self.dataset)):
                sample = self.dataset.load((index + skipped) % len(self.dataset))
                if sample is not None:
                    return (*sample, skipped)
        finally:
            if state is not None:  # loading in the main process: leave its random streams as they were
                _set_rng_state(state)
        raise DataError('no readable image in the training set')


def _rng_state():
    import random
    import numpy as np
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng_state(state) -> None:
    import random
    import numpy as np
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def collate_skips(samples: List[Optional[Tuple[Any, int, int]]]):
    """``(images, targets, skipped)``: the readable samples stacked, and how many unreadable images the batch
    left out or replaced (``data.bad_images=skip``)."""
    from torch.utils.data import default_collate
    good = [s[:2] for s in samples if s is not None]
    skipped = sum(1 if s is None else s[2] for s in samples)
    if not good:
        raise DataError(f'every image of a batch of {len(samples)} is unreadable (data.bad_images=skip)')
    images, targets = default_collate(good)
    return images, targets, torch.tensor(skipped)


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers ignore SIGTERM: a signal to the whole process group (SLURM ``--signal``, Kubernetes) must
    not kill them before the main process has finished its step and saved; they exit with it."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False, drop_last: Optional[bool] = None) \
        -> DataLoader:
    """A loader whose order and augmentation randomness depend only on (seed, epoch, rank, sample index).

    Training: call ``loader.sampler.set_epoch(epoch, skip)`` per epoch (``train.py`` does), which fixes the
    shuffle; each sample seeds its own augmentation (:class:`LoaderSamples`). Batches are ``(images, targets)``,
    plus the number of unreadable images left out or replaced, ``(images, targets, skipped)``, for data sets
    with ``bad_images='skip'``. ``drop_last=None``: training drops an incomplete last batch when the shard
    holds at least two batches.
    """
    sampler = TrainSampler(len(dataset), world_size, rank, seed, keyed=True) if train else \
        EvalSampler(len(dataset), world_size, rank)
    if drop_last is None:
        drop_last = train and len(sampler) >= 2 * batch_size
    samples = LoaderSamples(dataset, seed, train)
    return DataLoader(samples, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, collate_fn=collate_skips if samples.skips else None,
                      worker_init_fn=_ignore_sigterm if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)
