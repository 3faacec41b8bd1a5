"""Print RedNet-26/38/50/101/152 parameters and FLOPs (224x224) beside the paper's table, or with --ablation
the cost of the paper's involution ablations on RedNet-50, each row beside the default model.

    python scripts/model_table.py [--depths 26 50] [--input-size 224]
    python scripts/model_table.py --ablation [--input-size 224]

FLOPs are multiply-adds counted by ``rednet.flops.count_flops``; the main column uses the mmcv-style
convention of the paper's time (conv/fc/involution multiply-adds + BN, ReLU, pooling and bias elements) with the
default K=3 stem. The other columns: multiply-adds only, and mmcv-style with the K=7 (detection) stem.
--ablation varies the bottleneck involutions (the stem keeps K=3, 16 group channels, reduction 4): kernel size
3/5/7/9, group channels 1/4/8/16/32, reduction ratio 1/2/4/8, dilation 2.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import rednet  # noqa: E402,F401  (registers the models)
from rednet.flops import count_flops  # noqa: E402

# Li et al., CVPR 2021, Table 2 (ImageNet): params (M), FLOPs (G), top-1, top-5
PAPER = {
    26: (9.23, 1.73, 75.96, 93.19),
    38: (12.39, 2.22, 77.48, 93.57),
    50: (15.54, 2.71, 78.35, 94.13),
    101: (25.65, 4.74, 78.92, 94.35),
    152: (33.99, 6.79, 79.12, 94.38),
}


def table_rows(depths, input_size: int = 224):
    for depth in depths:
        model = timm.create_model(f'rednet{depth}')
        params = sum(p.numel() for p in model.parameters())
        shape = (3, input_size, input_size)
        flops = count_flops(model, shape)
        macs = count_flops(model, shape, elementwise=False)
        flops_k7 = count_flops(timm.create_model(f'rednet{depth}', stem_kernel_size=7), shape)
        yield depth, params, flops, macs, flops_k7, PAPER[depth]


# the paper's ablations (and the dilated variant), one hyperparameter at a time from the default (7, 16, 4, 1)
DEFAULT = dict(kernel_size=7, group_channels=16, reduction_ratio=4, dilation=1)
ABLATION = {'kernel_size': (3, 5, 7, 9), 'group_channels': (1, 4, 8, 16, 32), 'reduction_ratio': (1, 2, 4, 8),
            'dilation': (2,)}


def ablation_rows(input_size: int = 224, depth: int = 50):
    """(arguments, params, FLOPs) of the default model, then of every ablation variant that differs from it."""
    variants = [DEFAULT] + [{**DEFAULT, key: v} for key, values in ABLATION.items() for v in values
                            if v != DEFAULT[key]]
    for args in variants:
        model = timm.create_model(f'rednet{depth}', **args)
        yield args, sum(p.numel() for p in model.parameters()), count_flops(model, (3, input_size, input_size))


def print_ablation(input_size: int) -> None:
    print(f'| RedNet-50 variant | K | group channels | reduction | dilation | params | vs default '
          f'| FLOPs (G), {input_size}px | vs default |')
    print('|---|---|---|---|---|---|---|---|---|')
    base = None
    for args, params, flops in ablation_rows(input_size):
        base = base or (params, flops)
        changed = [f'{k}={v}' for k, v in args.items() if v != DEFAULT[k]]
        print(f'| {", ".join(changed) or "default"} | {args["kernel_size"]} | {args["group_channels"]} '
              f'| {args["reduction_ratio"]} | {args["dilation"]} | {params:,} | {params / base[0]:.3f}x '
              f'| {flops / 1e9:.3f} | {flops / base[1]:.3f}x |')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=sorted(PAPER), choices=sorted(PAPER))
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--ablation', action='store_true',
                        help='RedNet-50 with the involution ablations (kernel size, group channels, reduction, '
                             'dilation) instead of the depth table')
    args = parser.parse_args(argv)
    if args.ablation:
        print_ablation(args.input_size)
        return
    print('| model | params | params (paper) | FLOPs (G) | FLOPs (paper) | vs paper | MACs only (G) '
          '| FLOPs, K=7 stem (G) | top-1 (paper) | top-5 (paper) |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for depth, params, flops, macs, flops_k7, (p_params, p_flops, top1, top5) in table_rows(args.depths,
                                                                                          args.input_size):
        print(f'| RedNet-{depth} | {params:,} | {p_params:.2f}M | {flops / 1e9:.3f} | {p_flops:.2f} '
              f'| {100 * (flops / 1e9 / p_flops - 1):+.1f}% | {macs / 1e9:.3f} | {flops_k7 / 1e9:.3f} '
              f'| {top1:.2f} | {top5:.2f} |')


if __name__ == '__main__':
    main()
