"""eval.py on small generated data, for every checkpoint kind; class-count errors and class maps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import rednet
from rednet.checkpoint import save_released
from official_reference import official_state_dict, save_pdparams, to_paddle

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ('cat', 'dog', 'fox')


def _eval(*overrides, nproc: int = 1):
    cmd = [sys.executable, 'eval.py', 'progress=false', *map(str, overrides)]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               'eval.py', 'progress=false', *map(str, overrides)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """A tiny class-folder data set (val split): 3 classes, odd-sized RGB and grayscale images."""
    root = tmp_path_factory.mktemp('folder')
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(CLASSES):
        (root / 'val' / name).mkdir(parents=True)
        for j in range(3):
            arr = (torch.rand(45 + j, 37, 3, generator=g) * 255).to(torch.uint8).numpy()
            img = Image.fromarray(arr)
            (img.convert('L') if j == 2 else img).save(root / 'val' / name / f'{j}.png')
    return root


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """The same 3-class RedNet-26 weights as an mmcls file, a Paddle file and a released safetensors file."""
    d = tmp_path_factory.mktemp('ckpt')
    official = official_state_dict(26, num_classes=3, seed=5)
    torch.save({'meta': {}, 'state_dict': official}, d / 'rednet26.pth')
    save_pdparams(to_paddle(official), d / 'RedNet26.pdparams')
    model = rednet.load_model(d / 'rednet26.pth')
    save_released(model, d / 'rednet26.safetensors', 'rednet26', {})
    return d


def _expected_top1(model, folder):
    """Top-1 computed by hand with timm's eval transform for the model."""
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    correct = 0
    with torch.no_grad():
        for label, name in enumerate(CLASSES):
            for path in sorted((folder / 'val' / name).iterdir()):
                x = transform(Image.open(path).convert('RGB')).unsqueeze(0)
                correct += int(model.eval()(x).argmax(1).item() == label)
    return 100.0 * correct / (3 * len(CLASSES))


@pytest.mark.parametrize('name', ['rednet26.pth', 'RedNet26.pdparams', 'rednet26.safetensors'])
def test_eval_each_checkpoint_kind(tmp_path, folder, checkpoints, name):
    run = tmp_path / 'run'
    result = _eval(f'checkpoint={checkpoints / name}', 'data=imagefolder', f'data.root={folder}',
                   f'hydra.run.dir={run}', 'batch_size=4')
    assert result.returncode == 0, result.stderr
    out = json.loads((run / 'eval.json').read_text())
    assert out['images'] == 9 and out['arch'] == 'rednet26'
    assert out['transform']['img_size'] == 224 and out['transform']['crop_pct'] == 0.875
    expected = _expected_top1(rednet.load_model(checkpoints / name), folder)
    assert out['top1'] == pytest.approx(expected)
    assert out['top5'] == pytest.approx(100.0)  # 3 classes
    assert 'top-1' in result.stdout and f'{expected:.2f}%' in result.stdout


def test_eval_our_training_checkpoint_on_digits(tmp_path):
    model = timm.create_model('rednet26', num_classes=10, small_input=True)
    with torch.no_grad():  # always predicts 3, with 0, 1, 2, 4 next
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([4.0, 3.0, 2.0, 5.0, 1.0, 0, 0, 0, 0, 0]))
    path = tmp_path / 'best.pt'
    torch.save({'model': model.state_dict(), 'arch': 'rednet26',
                'model_args': {'num_classes': 10, 'small_input': True},
                'config': {'data': {'name': 'digits', 'img_size': 16, 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                    'mean': [0.5] * 3, 'std': [0.5] * 3}}}, path)
    result = _eval(f'checkpoint={path}', 'data=digits', f'hydra.run.dir={tmp_path / "run"}',
                   'involution_backend=reference')
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / 'run' / 'eval.json').read_text())
    assert out['images'] == 360 and out['transform']['img_size'] == 16
    # by hand: the share of 3s (top-1) and of 0-4s (top-5) in the data set's documented validation split
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    y = load_digits().target
    _, y_val = train_test_split(y, test_size=0.2, random_state=0, stratify=y)
    assert len(y_val) == 360
    assert out['top1'] == pytest.approx(100 * (y_val == 3).mean())
    assert out['top5'] == pytest.approx(100 * (y_val <= 4).mean())


def test_eval_distributed_matches_single_process(tmp_path, folder, checkpoints):
    single = _eval(f'checkpoint={checkpoints / "rednet26.pth"}', 'data=imagefolder', f'data.root={folder}',
                   f'hydra.run.dir={tmp_path / "one"}', 'batch_size=2')
    double = _eval(f'checkpoint={checkpoints / "rednet26.pth"}', 'data=imagefolder', f'data.root={folder}',
                   f'hydra.run.dir={tmp_path / "two"}', 'batch_size=2', nproc=2)
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    one = json.loads((tmp_path / 'one' / 'eval.json').read_text())
    two = json.loads((tmp_path / 'two' / 'eval.json').read_text())
    assert two['processes'] == 2 and two['images'] == one['images'] == 9
    assert two['top1'] == pytest.approx(one['top1']) and two['loss'] == pytest.approx(one['loss'], rel=1e-5)


def test_class_count_mismatch_and_class_map(tmp_path, folder):
    official = official_state_dict(26, num_classes=1000, seed=6)
    # a head that always predicts ImageNet class 207 (golden retriever), where the map sends 'dog'
    official['head.fc.weight'].zero_()
    official['head.fc.bias'].zero_()[207] = 10.0
    ckpt = tmp_path / 'in1k.pth'
    torch.save(official, ckpt)
    result = _eval(f'checkpoint={ckpt}', 'data=imagefolder', f'data.root={folder}', f'hydra.run.dir={tmp_path}')
    assert result.returncode == 2
    assert 'classifier has 1000 classes but data=imagefolder has 3' in result.stderr and 'class_map' in result.stderr
    class_map = tmp_path / 'map.json'
    class_map.write_text(json.dumps({'cat': 281, 'dog': 207, '2': 277}))
    result = _eval(f'checkpoint={ckpt}', 'data=imagefolder', f'data.root={folder}', f'class_map={class_map}',
                   f'hydra.run.dir={tmp_path / "mapped"}')
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / 'mapped' / 'eval.json').read_text())
    assert out['images'] == 9 and out['top1'] == pytest.approx(100 * 3 / 9)  # the 3 dog images, mapped to 207


def test_eval_errors_are_clear(tmp_path):
    result = _eval('data=digits')
    assert result.returncode == 2 and 'checkpoint=PATH' in result.stderr
    result = _eval(f'checkpoint={tmp_path / "missing.pt"}', 'data=digits', f'hydra.run.dir={tmp_path}')
    assert result.returncode == 2 and 'checkpoint not found' in result.stderr
    result = _eval(f'checkpoint={tmp_path / "x.pt"}', 'batchsize=3')
    assert result.returncode == 2 and "unknown eval key 'batchsize'" in result.stderr and 'batch_size' in result.stderr


def test_eval_uses_the_checkpoints_own_transform(tmp_path, folder):
    """A released file whose data pipeline (64 px, no crop margin, mean 0.2, std 0.1) differs from the data
    config's (224 px, crop 0.875, ImageNet mean/std), with a head fitted so that it classifies the 9 images right
    under its own pipeline only: eval.py must score 100%."""
    pipeline = dict(input_size=(3, 64, 64), crop_pct=1.0, interpolation='bilinear', mean=(0.2,) * 3, std=(0.1,) * 3)
    torch.manual_seed(0)
    model = timm.create_model('rednet26', num_classes=3, involution_backend='reference').eval()

    def features(**cfg):
        transform = timm.data.create_transform(**cfg)
        images = [Image.open(p).convert('RGB') for name in CLASSES for p in sorted((folder / 'val' / name).iterdir())]
        with torch.no_grad():
            return model.forward_head(model.forward_features(torch.stack([transform(i) for i in images])),
                                      pre_logits=True).double()
    labels = torch.arange(3).repeat_interleave(3)
    right = features(**pipeline)
    wrong = features(**{**pipeline, 'mean': timm.data.IMAGENET_DEFAULT_MEAN, 'std': timm.data.IMAGENET_DEFAULT_STD})
    # least-squares head on centred features: one-hot targets, exact on these 9 images
    centre = right.mean(0)
    w = torch.linalg.lstsq(right - centre, torch.eye(3, dtype=torch.float64)[labels] - 1 / 3).solution.T
    with torch.no_grad():
        model.fc.weight.copy_(w)
        model.fc.bias.copy_(-(w @ centre))

    def top1(feats):
        return 100.0 * float(((feats @ w.T - w @ centre).argmax(1) == labels).double().mean())
    assert top1(right) == 100.0 and top1(wrong) < 70.0  # the transform decides
    path = tmp_path / 'own.safetensors'
    save_released(model, path, 'rednet26', {}, **pipeline)
    result = _eval(f'checkpoint={path}', 'data=imagefolder', f'data.root={folder}', f'hydra.run.dir={tmp_path / "r"}',
                   'involution_backend=reference')
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / 'r' / 'eval.json').read_text())
    assert out['transform'] == dict(img_size=64, crop_pct=1.0, interpolation='bilinear', mean=[0.2] * 3,
                                    std=[0.1] * 3)
    assert out['top1'] == pytest.approx(100.0)
