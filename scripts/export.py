"""Export a model for serving, as ONNX or as an AOTInductor package, and check it against PyTorch.

    python scripts/export.py rednet50 --format onnx --out rednet50.onnx --batch 8 --dynamic-batch
    python scripts/export.py outputs/.../checkpoints/best.pt --format aoti --out digits.pt2
    python scripts/export.py RedNet50_pretrained.pdparams --format onnx --out rednet50.onnx --img-size 256

``MODEL_OR_CHECKPOINT`` is any file :func:`rednet.load_model` reads (our checkpoints and released files, official
mmcls files, PaddleClas ``.pdparams``) or a timm model name (``rednet50``, ``resnet50``, ...; random weights, since
nothing is downloaded). The model's preprocessing travels with the file, read from the checkpoint (or timm's
``pretrained_cfg``): ``mean``, ``std``, ``input_size``, ``crop_pct``, ``interpolation``, ``num_classes`` as
JSON strings in the ONNX model's ``metadata_props`` and in the package's AOTInductor metadata
(``aoti_load_package(path).get_metadata()``).

- ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter); every involution becomes one Gather and one
  MatMul (:mod:`rednet.ops.onnx_form`). Checked in onnxruntime (CPU provider).
- ``aoti``: ``torch.export.export`` then ``torch._inductor.aoti_compile_and_package`` (a ``.pt2`` file, loaded with
  ``torch._inductor.aoti_load_package``; Inductor fuses each involution's taps into one loop). Compiling RedNet-50
  takes minutes on a small CPU.

Both run the exported model on a random input of ``--batch`` images (and, with ``--dynamic-batch``, on one more
image than that, through the symbolic batch dimension), print the max abs error against the PyTorch model and the
file size, and exit with status 1 if the error exceeds ``TOLERANCE`` x max(1, max |logit|); 2 on bad arguments.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import rednet  # noqa: E402  (registers the RedNets with timm)

# max abs error allowed, relative to the scale of the logits (float32 runtimes sum in other orders)
TOLERANCE = 1e-4


class ExportError(ValueError):
    """Arguments that cannot be exported (unknown model, bad size)."""


def load_source(source: str) -> nn.Module:
    """A checkpoint file (anything rednet.load_model reads) or a timm model name -> model in eval mode."""
    import timm
    if os.path.isfile(source):
        return rednet.load_model(source).eval()
    if timm.is_model(source):
        print(f'{source}: a timm model name; exporting its architecture with random weights (give a checkpoint '
              f'file for trained ones)')
        return timm.create_model(source).eval()
    raise ExportError(f'{source!r} is neither a file nor a timm model name. Give a checkpoint that '
                      f'rednet.load_model reads (.pt, .pth, .safetensors, .pdparams) or a name such as rednet50 '
                      f'or resnet50 (python -c "import timm, rednet; print(timm.list_models(\'*rednet*\'))").')


def preprocessing(model: nn.Module, img_size: int) -> Dict[str, str]:
    """The model's eval preprocessing as string metadata (JSON values): what a server must do to an image."""
    import timm
    cfg = timm.data.resolve_data_config({}, model=model)
    in_chans = int(cfg['input_size'][0])
    meta = dict(mean=list(cfg['mean']), std=list(cfg['std']), input_size=[in_chans, img_size, img_size],
                crop_pct=float(cfg['crop_pct']), interpolation=cfg['interpolation'],
                num_classes=int(getattr(model, 'num_classes', 0)), input_layout='NCHW, RGB, float32',
                output='logits')
    return {k: json.dumps(v) for k, v in meta.items()}


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim('batch', min=1, max=1024)},) if dynamic_batch else None


def export_onnx(model: nn.Module, x: torch.Tensor, out: Path, meta: Dict[str, str], dynamic_batch: bool) -> None:
    import onnx
    program = torch.onnx.export(model, (x,), input_names=['image'], output_names=['logits'], dynamo=True,
                                dynamic_shapes=_dynamic_shapes(dynamic_batch), verbose=False)
    program.save(str(out), external_data=False)
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(out))


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def export_aoti(model: nn.Module, x: torch.Tensor, out: Path, meta: Dict[str, str], dynamic_batch: bool) -> None:
    program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    torch._inductor.aoti_compile_and_package(program, package_path=str(out),
                                             inductor_configs={'aot_inductor.metadata': meta})


def aoti_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = torch._inductor.aoti_load_package(str(path))
    return lambda x: compiled(x)


FORMATS = {'onnx': (export_onnx, onnx_runner), 'aoti': (export_aoti, aoti_runner)}


def verify(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], inputs) -> Tuple[float, float]:
    """(max abs error of the exported model against PyTorch over the inputs, allowed error)."""
    err, scale = 0.0, 1.0
    for x in inputs:
        with torch.no_grad():
            want = model(x)
        got = run(x)
        if got.shape != want.shape:
            raise AssertionError(f'exported model returned shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}')
        err = max(err, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return err, TOLERANCE * scale


def export(source: str, fmt: str, out: Path, batch: int = 1, img_size: int = 0, dynamic_batch: bool = False) -> bool:
    """Export and verify; True when the exported model matches PyTorch. Prints what it did."""
    model = load_source(source)
    cfg_size = int(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))[-1])
    img_size = img_size or cfg_size
    if batch < 1 or img_size < 1:
        raise ExportError(f'--batch and --img-size must be positive, got {batch} and {img_size}')
    meta = preprocessing(model, img_size)
    in_chans = json.loads(meta['input_size'])[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, img_size, img_size, generator=gen)
    do_export, runner = FORMATS[fmt]
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # torch.export specialises a dimension whose example size is 1: trace a dynamic batch with two images
    do_export(model, torch.cat([x, x]) if dynamic_batch and batch == 1 else x, out, meta, dynamic_batch)
    seconds = time.perf_counter() - t0
    inputs = [x] + ([torch.randn(batch + 1, in_chans, img_size, img_size, generator=gen)] if dynamic_batch else [])
    err, tol = verify(model, runner(out), inputs)
    ok = err <= tol
    batches = ' and '.join(str(len(t)) for t in inputs)
    print(f'{fmt}: wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MB) in {seconds:.1f} s; '
          f'{"dynamic" if dynamic_batch else "static"} batch; input {in_chans}x{img_size}x{img_size}')
    print(f'{fmt} vs PyTorch (batch {batches}): max abs error {err:.3g} (tolerance {tol:.3g}): '
          f'{"OK" if ok else "MISMATCH"}')
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', metavar='MODEL_OR_CHECKPOINT', help='checkpoint file or timm model name')
    p.add_argument('--format', required=True, choices=sorted(FORMATS))
    p.add_argument('--out', required=True, type=Path, help='output file (.onnx or .pt2)')
    p.add_argument('--batch', type=int, default=1, help='batch of the example input (the static batch)')
    p.add_argument('--img-size', type=int, default=0, help="input height and width (default: the model's)")
    p.add_argument('--dynamic-batch', action='store_true', help='symbolic batch dimension (1 to 1024)')
    args = p.parse_args(argv)
    if args.format == 'onnx':
        missing = [m for m in ('onnx', 'onnxruntime', 'onnxscript') if importlib.util.find_spec(m) is None]
        if missing:
            print(f"error: --format onnx needs {', '.join(missing)}: pip install -e '.[deploy]'", file=sys.stderr)
            return 2
    try:
        ok = export(args.source, args.format, args.out, args.batch, args.img_size, args.dynamic_batch)
    except (ExportError, FileNotFoundError, rednet.checkpoint.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
