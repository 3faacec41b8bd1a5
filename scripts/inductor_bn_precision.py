"""Standalone repro (pure PyTorch, no rednet): inductor on the CPU computes batch-norm training statistics of its
channels_last activations less accurately than eager, so compiled float32 forward values drift ~3x further from
float64 than eager's, and some ReLU masks flip.

Why it matters (docs/gpu.md, "Compiled training precision"): a ReLU network's gradient is discontinuous in its
forward values. One ReLU mask that flips (a pre-activation within rounding distance of 0 lands on the other side)
changes that element's gradient from g to 0 or back: an O(1) change, not a rounding-sized one. A bias gradient
``sum_(n,h,w) g * mask`` whose terms nearly cancel (behind a training-mode BatchNorm every channel's gradient sums
to zero) then moves by up to 1e-3 .. 1e-1 of its size. Eager float32 flips (almost) no masks; the compiled model,
with its larger forward error, does: RedNet (1,1,1,1) at 32x32, batch 2, flipped one of the 262,144 ReLU outputs of
its layer2 block, and that block's bias gradients were 9.4e-4 (relative) from float64's.

What inductor does: with mkldnn available, ``GraphLowering.decide_layout_opt`` always switches convolution
activations to channels_last on the CPU (``torch._inductor.config.layout_optimization``). Batch norm then reduces
each channel over the strided N*H*W axis: the C++ kernel vectorises across channels and each lane adds its N*H*W
values one after the other in float32 (``need_use_acc_helper``: cascade summation only above 4096 elements; the
Welford helper likewise). Eager ATen on an NCHW tensor accumulates batch-norm statistics in double
(``acc_type<float, false>``). ``layout_optimization=False`` keeps the activations NCHW and brings the compiled
error back to eager's; ``cpp.use_two_step_variance_threshold`` (two-pass variance instead of Welford) does not.

Run: ``python scripts/inductor_bn_precision.py`` (about a minute on 2 cores). Prints, per configuration, the
largest error of the output relative to its largest value, against float64, and the ReLU masks that differ from
float64's.
"""
import copy

import torch
import torch.nn as nn


def main() -> None:
    torch.set_num_threads(1)
    configs = (('default', {}), ('layout_optimization=False', {'layout_optimization': False}),
               ('two-step variance', {'cpp.use_two_step_variance_threshold': 1 << 30}))
    print('| seed | eager float32 | ' + ' | '.join(f'inductor, {name}' for name, _ in configs) + ' |')
    print('|---|---|' + '---|' * len(configs))
    for seed in range(3):
        torch.manual_seed(seed)
        # conv -> BN -> ReLU twice, batch 2 at 32x32: 2048 values per channel (the stem of a CIFAR-sized ResNet)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.Conv2d(32, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(x.double())
            scale = ref.abs().max()

            def report(out):
                err = float((out.double() - ref).abs().max() / scale)
                flips = int(((out > 0) != (ref > 0)).sum())
                return f'{err:.2g} ({flips} flips)'

            cells = [report(copy.deepcopy(model)(x))]
            for _, options in configs:
                torch._dynamo.reset()
                cells.append(report(torch.compile(copy.deepcopy(model), options=options)(x)))
        print(f'| {seed} | ' + ' | '.join(cells) + ' |', flush=True)
    print(f'\n({ref.numel()} ReLU outputs per run; torch {torch.__version__})')


if __name__ == '__main__':
    main()
