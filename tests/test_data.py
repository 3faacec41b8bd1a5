"""Data sets on small generated data: digits, synthetic, image folders (bad images, colour modes), CIFAR."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _train_utils import compose  # noqa: F401  (puts the repository root on sys.path)
from rednet import data as rdata


def _folder_cfg(root, **kw):
    cfg = dict(name='imagefolder', root=str(root), train_split='train', val_split='val', img_size=16,
               crop_pct=1.0, interpolation='bilinear', mean=[0.5] * 3, std=[0.5] * 3, train_crop='rrc',
               scale=[0.5, 1.0], ratio=[0.75, 1.333], hflip=0.5, color_jitter=0.0, auto_augment=None, re_prob=0.0,
               bad_images='error')
    cfg.update(kw)
    return cfg


def _image(mode, size=(20, 14)):
    rng = np.random.default_rng(0)
    if mode == 'CMYK':
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8), 'CMYK')
    if mode == 'P':
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert('P')
    return Image.new(mode, size, color=(128,) * len(mode) if len(mode) > 1 else 128)


def _make_folder(root, corrupt=False):
    """train/ and val/ with two classes, every colour mode, optionally one corrupt file."""
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            d = root / split / cls
            d.mkdir(parents=True)
            _image('RGB').save(d / 'rgb.png')
            _image('L').save(d / 'gray.png')
            _image('P').save(d / 'palette.png')
            _image('RGBA').save(d / 'alpha.png')
            _image('CMYK').save(d / 'cmyk.jpg')
            _image('LA').save(d / 'gray_alpha.png')
    if corrupt:
        (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    return root


def test_digits_split_is_fixed_and_stratified():
    a, b = rdata.DigitsDataset(True, 16), rdata.DigitsDataset(True, 16)
    val = rdata.DigitsDataset(False, 16)
    assert (len(a), len(val)) == (1437, 360)
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    assert a.images.shape == (1437, 3, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # about 36 of each digit
    # train and val are disjoint: no validation image appears in the training set
    flat = {tuple(x.flatten().tolist()) for x in rdata.DigitsDataset(True, 8).images[:, 0]}
    overlap = sum(tuple(x.flatten().tolist()) in flat for x in rdata.DigitsDataset(False, 8).images[:, 0])
    assert overlap < 5  # (the 8x8 digits contain a handful of exact duplicates)


def test_digits_and_synthetic_through_build_dataset():
    cfg = compose(['data=digits']).data
    ds = rdata.build_dataset(cfg, train=True)
    x, y = ds[0]
    assert x.shape == (3, cfg.img_size, cfg.img_size) and x.dtype == torch.float32 and 0 <= y < 10
    syn = compose(['data=synthetic', 'data.img_size=8', 'data.train_size=20']).data
    a, b = rdata.build_dataset(syn, True, seed=3), rdata.build_dataset(syn, True, seed=3)
    assert len(a) == 20 and torch.equal(a.images, b.images) and a.targets == b.targets
    assert a[0][0].shape == (3, 8, 8) and len(rdata.build_dataset(syn, False)) == syn.val_size


def test_imagefolder_converts_every_mode_to_rgb(tmp_path):
    root = _make_folder(tmp_path / 'ds')
    cfg = _folder_cfg(root)
    train_set = rdata.build_dataset(cfg, True)
    val_set = rdata.build_dataset(cfg, False, class_to_idx=train_set.class_to_idx)
    assert train_set.classes == ['cat', 'dog'] and len(train_set) == 12 and len(val_set) == 12
    for i in range(len(train_set)):
        x, y = train_set[i]
        assert x.shape == (3, 16, 16) and y in (0, 1)
    for path, _ in train_set.samples:
        assert rdata.load_rgb(path).mode == 'RGB'
    loader = rdata.build_loader(val_set, 5, False)
    assert sum(len(y) for _, y in loader) == 12


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _make_folder(tmp_path / 'ds', corrupt=True)
    ds = rdata.build_dataset(_folder_cfg(root), True)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith('broken.jpg')][0]
    with pytest.raises(rdata.BadImageError, match='broken.jpg') as e:
        ds[idx]
    assert 'data.bad_images=skip' in str(e.value)


def test_corrupt_image_skipped_with_warning_and_count(tmp_path):
    root = _make_folder(tmp_path / 'ds', corrupt=True)
    ds = rdata.build_dataset(_folder_cfg(root, bad_images='skip'), True)
    with pytest.warns(UserWarning, match=r'broken\.jpg.*1 skipped'):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 1 and len(items) == len(ds)
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once per file
        [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 1


def test_missing_root_and_empty_splits(tmp_path):
    with pytest.raises(rdata.DataError, match='data.root'):
        rdata.build_dataset(_folder_cfg(None), True)
    with pytest.raises(rdata.DataError, match='does not exist'):
        rdata.build_dataset(_folder_cfg(tmp_path / 'nope'), True)
    (tmp_path / 'ds' / 'train').mkdir(parents=True)
    with pytest.raises(rdata.DataError, match=r'train.*empty'):
        rdata.build_dataset(_folder_cfg(tmp_path / 'ds'), True)
    (tmp_path / 'ds' / 'train' / 'cat').mkdir()
    (tmp_path / 'ds' / 'train' / 'cat' / 'notes.txt').write_text('no images here')
    with pytest.raises(rdata.DataError, match='no images'):
        rdata.build_dataset(_folder_cfg(tmp_path / 'ds'), True)
    with pytest.raises(rdata.DataError, match=r'val.*does not exist'):
        rdata.build_dataset(_folder_cfg(tmp_path / 'ds'), False)


def test_cifar_offline_message_says_where_to_put_files(tmp_path):
    cfg = compose(['data=cifar10', f'data.root={tmp_path}', 'data.download=false']).data
    with pytest.raises(rdata.DataError) as e:
        rdata.build_dataset(cfg, True)
    msg = str(e.value)
    assert str(tmp_path / 'cifar-10-batches-py') in msg and 'cifar-10-python.tar.gz' in msg


def _fake_cifar(root, n=6):
    d = root / 'cifar-10-batches-py'
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(d / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         'labels': rng.integers(0, 10, n).tolist()}, f)
    with open(d / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'c{i}' for i in range(10)]}, f)


def test_cifar_loads_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    _fake_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar.CIFAR10, '_check_integrity', lambda self: True)  # our files lack the real md5s
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda *args, **kwargs: True)
    cfg = compose(['data=cifar10', f'data.root={tmp_path}', 'data.download=false']).data
    train_set, val_set = rdata.build_dataset(cfg, True), rdata.build_dataset(cfg, False)
    assert (len(train_set), len(val_set)) == (30, 6)
    x, y = train_set[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert 'RandomCrop(size=(32, 32), padding=4)' in repr(train_set.transform)


def test_train_sampler_is_a_function_of_seed_and_epoch():
    s = rdata.TrainSampler(10, num_replicas=2, rank=0, seed=1)
    t = rdata.TrainSampler(10, num_replicas=2, rank=1, seed=1)
    s.set_epoch(3), t.set_epoch(3)
    a, b = list(s), list(t)
    assert sorted(a + b) == list(range(10)) and len(a) == len(s) == 5
    s.set_epoch(3)
    assert list(s) == a
    s.set_epoch(4)
    assert list(s) != a
    s.set_epoch(3, skip=2)
    assert list(s) == a[2:] and len(s) == 3
    odd = rdata.TrainSampler(7, num_replicas=2, rank=1)
    assert len(list(odd)) == 4  # padded like DistributedSampler
    ev = [list(rdata.EvalSampler(7, 2, r)) for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(7))  # each image exactly once


# ---------------------------------------------------------------------------------------------------------
# the padded random crop (train_crop=pad: CIFAR, digits), checked against windows of a hand-padded image

MEAN, STD = (0.21, 0.41, 0.61), (0.5, 0.25, 0.125)
SIZE, PAD = 8, 2


def _pad_cfg(**kw):
    cfg = dict(img_size=SIZE, train_crop='pad', crop_padding=PAD, hflip=0.5, re_prob=0.0, color_jitter=0.0,
               auto_augment=None, mean=list(MEAN), std=list(STD), scale=[0.08, 1.0], ratio=[0.75, 1.333],
               interpolation='bilinear', crop_pct=1.0)
    cfg.update(kw)
    return cfg


def _distinct_image():
    """An 8x8 RGB image whose 192 values are all different and none 0 (the padding's value)."""
    values = np.random.default_rng(1).permutation(np.arange(1, 193)).astype(np.uint8).reshape(SIZE, SIZE, 3)
    return values, Image.fromarray(values)


def _windows(values):
    """{(flipped, top, left): the normalised SIZE x SIZE window of the image zero-padded by PAD, as (C, H, W)}."""
    padded = np.pad(values / 255.0, ((PAD, PAD), (PAD, PAD), (0, 0)))
    out = {}
    for flipped in (False, True):
        for top in range(2 * PAD + 1):
            for left in range(2 * PAD + 1):
                w = padded[top:top + SIZE, left:left + SIZE]
                w = w[:, ::-1] if flipped else w
                out[flipped, top, left] = torch.from_numpy(((w - MEAN) / STD).transpose(2, 0, 1).copy()).float()
    return out


def _which_window(y, windows):
    keys, stacked = list(windows), torch.stack(list(windows.values()))
    hits = [keys[i] for i in torch.nonzero((stacked - y).abs().amax((1, 2, 3)) < 1e-5).flatten().tolist()]
    assert len(hits) == 1, f'the output is not one window of the padded image: {hits}'
    return hits[0]


@pytest.mark.parametrize('tensor_input', [False, True], ids=['pil', 'tensor'])
def test_pad_crop_is_a_window_of_the_zero_padded_image(tensor_input):
    """CIFAR (PIL images) and digits (tensors): every output is a window of the image zero-padded by
    crop_padding, normalised with the config's mean/std; all (2 x 2 + 1)^2 offsets occur, and flips."""
    values, img = _distinct_image()
    x = torch.from_numpy(values.transpose(2, 0, 1) / 255.0).float() if tensor_input else img
    transform = rdata.build_transform(_pad_cfg(), True, tensor_input=tensor_input)
    windows, seen = _windows(values), set()
    for seed in range(300):
        rdata.seed_sample(seed)
        y = transform(x)
        assert y.shape == (3, SIZE, SIZE) and y.dtype == torch.float32
        seen.add(_which_window(y, windows))
    assert {(top, left) for _, top, left in seen} == {(t, s) for t in range(5) for s in range(5)}
    assert {flipped for flipped, _, _ in seen} == {False, True}
    # a window at the corner holds padding: zeros normalised to -mean / std
    corner = windows[False, 0, 0]
    assert torch.allclose(corner[:, 0, 0], -torch.tensor(MEAN) / torch.tensor(STD))


@pytest.mark.parametrize('hflip,low,high', [(0.0, 0, 0), (0.25, 60, 140), (0.5, 150, 250)])
def test_pad_crop_flips_with_probability_hflip(hflip, low, high):
    """400 samples: the flipped ones are Binomial(400, hflip) (bounds at about 4.5 standard deviations)."""
    values, img = _distinct_image()
    transform = rdata.build_transform(_pad_cfg(hflip=hflip), True)
    windows = _windows(values)
    flips = 0
    for seed in range(400):
        rdata.seed_sample(seed)
        flips += _which_window(transform(img), windows)[0]
    assert low <= flips <= high, flips


def _erased(y):
    """Whether some pixel is exactly 0 in every channel: RandomErasing's constant fill. The normalised image has
    no 0 ((v - mean) / std, v = k / 255, with means that are no multiples of 1 / 255)."""
    return bool((y == 0).all(0).any())


@pytest.mark.parametrize('crop', ['pad', 'rrc'])
def test_random_erasing_fills_with_zeros_on_both_paths(crop):
    """re_prob=1: timm's RandomErasing in its default mode (a constant 0 after normalisation) erases a rectangle
    of every training image, on the CIFAR path as on the ImageNet one ('pixel' mode would fill random values)."""
    _, img = _distinct_image()
    transform = rdata.build_transform(_pad_cfg(train_crop=crop, re_prob=1.0, scale=[0.5, 1.0]), True)
    plain = rdata.build_transform(_pad_cfg(train_crop=crop, re_prob=0.0, scale=[0.5, 1.0]), True)
    for seed in range(20):
        rdata.seed_sample(seed)
        assert _erased(transform(img)), seed
        rdata.seed_sample(seed)
        assert not _erased(plain(img)), seed


def test_missing_data_keys_take_the_schema_defaults():
    """A plain dict (a checkpoint's stored data config) or an OmegaConf node without some keys reads them from
    DataConfig, so the schema holds the only defaults."""
    from dataclasses import asdict
    from omegaconf import OmegaConf
    from rednet.train_config import DataConfig
    schema = asdict(DataConfig())
    node = OmegaConf.create({'img_size': 12})
    OmegaConf.set_struct(node, True)
    for cfg in ({}, {'img_size': 12}, node):
        for key, value in schema.items():
            want = 12 if key == 'img_size' and cfg else value
            assert rdata._get(cfg, key) == want, key
    assert rdata._get({'hflip': 0.0, 'root': None}, 'hflip') == 0.0  # a stored value wins, also a falsy one
    assert rdata._get({'root': None}, 'root') is None
    # a dict with only what differs from the schema builds the schema's pipeline (flip 0.5, no erasing)
    transform = rdata.build_transform(dict(img_size=SIZE, train_crop='pad', crop_padding=PAD), True)
    names = [type(op).__name__ for op in transform.transforms]
    assert names == ['RandomCrop', 'RandomHorizontalFlip', 'MaybeToTensor', 'Normalize'], names
    assert transform.transforms[1].p == DataConfig.hflip
