"""Convert an official (mmcls), PaddleClas or rednet checkpoint into our released format (safetensors).

    python scripts/convert.py IN OUT.safetensors [--mean R G B --std R G B --input-size 224 --crop-pct 0.875]

The output holds the weights plus the metadata that rebuilds the model (architecture and its arguments, class
count) and its eval pipeline (input size, crop_pct, mean/std). Load it with ``rednet.load_model(OUT)``,
``python eval.py checkpoint=OUT`` or ``timm.create_model(arch, pretrained=True,
pretrained_cfg_overlay=dict(file=OUT))``. The script reloads the result and checks that it gives identical
weights and logits before it reports success.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rednet  # noqa: E402
from rednet.checkpoint import convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', type=Path, help='official .pth, PaddleClas .pdparams, or a rednet checkpoint')
    parser.add_argument('dst', type=Path, help='output .safetensors file')
    parser.add_argument('--mean', type=float, nargs=3, help='normalisation mean (0-1 scale)')
    parser.add_argument('--std', type=float, nargs=3, help='normalisation std (0-1 scale)')
    parser.add_argument('--input-size', type=int, help='eval input size (square)')
    parser.add_argument('--crop-pct', type=float, help='eval centre-crop fraction')
    args = parser.parse_args(argv)
    if args.dst.suffix != '.safetensors':
        parser.error(f'output must end in .safetensors, got {args.dst}')
    overrides = {k: v for k, v in dict(mean=args.mean and tuple(args.mean), std=args.std and tuple(args.std),
                                        crop_pct=args.crop_pct).items() if v is not None}
    if args.input_size:
        overrides['input_size'] = (3, args.input_size, args.input_size)

    model = convert_checkpoint(args.src, args.dst, **overrides).eval()
    reloaded = rednet.load_model(args.dst).eval()
    size = model.pretrained_cfg['input_size'][1:] if not model.small_input else (32, 32)
    x = torch.randn(2, model.stem.conv1.conv.in_channels, *size, generator=torch.Generator().manual_seed(0))
    theirs, ours = model.state_dict(), reloaded.state_dict()
    with torch.no_grad():
        same = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs) and \
            torch.allclose(model(x), reloaded(x), rtol=0, atol=0, equal_nan=True)
    if not same:
        print(f'error: {args.dst} does not reproduce the logits of {args.src}', file=sys.stderr)
        return 1
    arch = reloaded.pretrained_cfg.get('architecture')
    params = sum(p.numel() for p in reloaded.parameters())
    print(f'wrote {args.dst}: {arch} ({params:,} parameters, {reloaded.num_classes} classes, '
          f'stem K={reloaded.stem.inv.kernel_size}); reloaded weights and logits identical')
    return 0


if __name__ == '__main__':
    sys.exit(main())
