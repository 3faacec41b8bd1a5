"""Print RedNet-26/38/50/101/152 parameters and FLOPs (224x224) beside the paper's table.

    python scripts/model_table.py [--depths 26 50] [--input-size 224]

FLOPs are multiply-adds counted by ``rednet.flops.count_flops``; the main column uses the mmcv-style
convention of the paper's time (conv/fc/involution multiply-adds + BN, ReLU, pooling and bias elements) with the
default K=3 stem. The other columns: multiply-adds only, and mmcv-style with the K=7 (detection) stem.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=sorted(PAPER), choices=sorted(PAPER))
    parser.add_argument('--input-size', type=int, default=224)
    args = parser.parse_args(argv)
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
