"""Benchmark the involution backends and whole RedNets against ResNets, side by side in one run.

Prints markdown tables:
1. the operator at the RedNet-50 stage shapes (batch 8, 224 input, K=7, G=C/16), forward and forward+backward
   per backend: median time, peak workspace (memory allocated beyond the output / output and the two
   gradients, i.e. what the operator itself needs), and speedup vs ``reference``;
2. whole models: one SGD training step and one inference pass (eval mode, no grad) for RedNet-26/50 per
   backend against torchvision ResNet-50 and timm ResNet-26 (a ResNet of RedNet-26's depth): img/s, peak
   memory allocated during the step, and ratios vs ResNet-50; with ``--bounds`` also two lower-bound RedNet
   variants whose involutions (or only their aggregation) are replaced by free stand-ins, i.e. the speed no
   involution kernel can beat in that mode.
3. one involution layer, training forward+backward with its span conv fused into the aggregation or not
   (what ``fuse_span=None`` decides by).
4. ``--deploy`` (alone): inference of ResNet-50 vs RedNet-50 and ResNet-26 vs RedNet-26 in eager, ``torch.compile``,
   AOTInductor and ONNX Runtime (exports by ``scripts/export.py``): img/s, ratio, compile/export time, file size.

Repeats are interleaved round-robin across the compared variants, so background load hits all of them alike;
ratios from one run are what count. Times are medians; the minimum (best of the repeats) is printed beside
them because on a shared CPU other processes inflate some repeats enormously (each parallel region of a
2-thread op waits for a descheduled thread). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak
of the allocation trace of ``torch.profiler`` (``profile_memory=True``) on CPU, both relative to what was
allocated before the measured call.

    python scripts/benchmark.py                       # CPU, float32, everything (a few minutes on 2 cores)
    python scripts/benchmark.py --ops-only --repeats 10
    python scripts/benchmark.py --device cuda --dtype bfloat16 --backends native,triton,reference
    python scripts/benchmark.py --backends reference,native,cpp,cpp-fused,cpp-unfused --bounds   # the README's
    python scripts/benchmark.py --models-only --models resnet50,rednet50 --backends functional,cpp --compile
        # what `auto` should run under torch.compile on the CPU (rednet.ops.COMPILE_AUTO), with compile times
    python scripts/benchmark.py --device cuda --dtype bfloat16 --channels-last --models-only \
        --models resnet50,rednet50 --backends functional,triton [--compile]    # the GPU comparison
    python scripts/benchmark.py --models-only --models resnet50,rednet50 --backends cpp-fused,cpp-unfused
    python scripts/benchmark.py --models-only --models resnet50,rednet50 --backends native --bounds
    python scripts/benchmark.py --fuse-only          # one layer, span conv fused vs unfused (fuse_span's thresholds)
    python scripts/benchmark.py --deploy --bounds --threads 2   # eager / torch.compile / AOTInductor / ONNX Runtime
    python scripts/benchmark.py --models-only --models rednet50 --backends cpp,cpp-fused,cpp-unfused \
        --small-input --img-size 32 --batch 64     # CIFAR-sized training
"""
import argparse
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import rednet  # noqa: E402,F401  (registers the RedNets with timm)
from rednet.ops import INDUCTOR_OPTIONS, involution, output_size  # noqa: E402

# (N, C, H=W, stride): the involutions of RedNet-50 at 224x224, batch 8 (the stage shapes, plus the stride-2
# first block of stage 2)
OP_SHAPES = [(8, 64, 56, 1), (8, 128, 56, 2), (8, 128, 28, 1), (8, 256, 14, 1), (8, 512, 7, 1)]


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started (result kept)."""
    gc.collect()
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each fn (all repeats), the repeats interleaved round-robin."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for k, fn in fns.items():
        for _ in range(warmup):
            fn()
    sync(device)
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def med(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_mb(b: float) -> str:
    return f'{b / 2 ** 20:.1f}'


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (read + write of a 256 MB tensor): the ceiling the kernels' GB/s
    are compared with."""
    src = torch.empty(64 << 20, device=device)
    dst = torch.empty_like(src)
    times = interleaved_times({'copy': lambda: dst.copy_(src)}, 5, device)['copy']
    return 2 * src.numel() * src.element_size() / min(times) / 1e9


def bench_ops(args, device, dtype, backends) -> None:
    bw = copy_bandwidth(device)
    print(f'\n### Involution operator, K=7, G=C/16, {dtype_name(dtype)}, {device_desc(device)}\n')
    print(f'GB/s: the bytes an operator must move at least (forward: x, kernel map, out; fwd+bwd: also grad_out, '
          f'x and the kernel map again, grad_x, grad kernel map) over its best time; measured copy bandwidth '
          f'{bw:.1f} GB/s.\n')
    print('| shape (N, C, H=W), stride | backend | forward ms (min) | fwd+bwd ms (min) | fwd speedup | fwd+bwd speedup '
          '| fwd workspace MB | fwd+bwd workspace MB | fwd+bwd workspace / input | fwd GB/s | fwd+bwd GB/s '
          '| fwd+bwd % of copy |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    k = 7
    for n, c, h, s in OP_SHAPES:
        g = c // 16
        ho = output_size(h, k, s, (k - 1) // 2, 1)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, h, generator=gen).to(device, dtype).requires_grad_(True)
        w = (torch.randn(n, g, k, k, ho, ho, generator=gen) * 0.1).to(device, dtype).requires_grad_(True)
        go = torch.randn(n, c, ho, ho, generator=gen).to(device, dtype)
        in_bytes = x.numel() * x.element_size()
        out_bytes = go.numel() * go.element_size()
        grads_bytes = in_bytes + w.numel() * w.element_size()
        fwd_traffic = grads_bytes + out_bytes
        fb_traffic = 3 * grads_bytes + 2 * out_bytes

        def fwd(b):
            with torch.no_grad():
                return involution(x, w, stride=s, backend=b)

        def fwd_bwd(b):
            out = involution(x, w, stride=s, backend=b)
            return torch.autograd.grad(out, (x, w), go), out

        usable = []
        for b in backends:
            if b.endswith(tuple(FUSE_SUFFIXES)):  # a whole-model variant only
                continue
            try:
                fwd(b)
                usable.append(b)
            except (ValueError, RuntimeError) as e:
                print(f'| {(n, c, h)}, {s} | {b} | n/a: {str(e)[:80]} | | | | | | | | | |')
        f_all = interleaved_times({b: (lambda b=b: fwd(b)) for b in usable}, args.repeats, device)
        fb_all = interleaved_times({b: (lambda b=b: fwd_bwd(b)) for b in usable}, args.repeats, device)
        f_times, fb_times = med(f_all), med(fb_all)
        ref_f, ref_fb = f_times.get('reference'), fb_times.get('reference')
        for b in usable:
            ws_f = peak_bytes(lambda: fwd(b), device) - out_bytes
            ws_fb = peak_bytes(lambda: fwd_bwd(b), device) - out_bytes - grads_bytes
            sp_f = f'{ref_f / f_times[b]:.1f}x' if ref_f else '-'
            sp_fb = f'{ref_fb / fb_times[b]:.1f}x' if ref_fb else '-'
            print(f'| {(n, c, h)}, {s} | {b} | {f_times[b] * 1e3:.1f} ({min(f_all[b]) * 1e3:.1f}) '
                  f'| {fb_times[b] * 1e3:.1f} ({min(fb_all[b]) * 1e3:.1f}) | {sp_f} | {sp_fb} '
                  f'| {fmt_mb(max(ws_f, 0))} | {fmt_mb(max(ws_fb, 0))} | {max(ws_fb, 0) / in_bytes:.2f} '
                  f'| {fwd_traffic / min(f_all[b]) / 1e9:.1f} | {fb_traffic / min(fb_all[b]) / 1e9:.1f} '
                  f'| {100 * fb_traffic / min(fb_all[b]) / 1e9 / bw:.0f}% |', flush=True)
        del x, w, go
        gc.collect()


# (N, C, H=W, stride) of the fused-vs-unfused layer table: RedNet-50's involutions at 224x224 (batch 8) and with
# the small-input stem at 32x32 (CIFAR, batch 64)
FUSE_SHAPES = [(8, 64, 56, 1), (8, 128, 56, 2), (8, 128, 28, 1), (8, 256, 14, 1), (8, 512, 7, 1),
               (64, 64, 32, 1), (64, 128, 32, 2), (64, 128, 16, 1), (64, 256, 8, 1), (64, 512, 4, 1)]


def bench_fuse(args, device, dtype, backends) -> None:
    """One Involution layer (kernel generator + aggregation), training forward+backward, with the span conv fused
    into the aggregation or not, per backend that can fuse (native, cpp): the measurement behind
    ``fuse_span=None``'s thresholds (rednet.model.FUSE_MIN_BYTES)."""
    from rednet.model import FUSE_MIN_BYTES, Involution
    print(f'\n### One involution layer, fwd+bwd, span conv fused vs unfused, {dtype_name(dtype)}, '
          f'{device_desc(device)}\n')
    print('| shape (N, C, H=W), stride | backend | kernel map MB | unfused ms (min) | fused ms (min) '
          '| fused / unfused | default (fuse_span=None) |')
    print('|---|---|---|---|---|---|---|')
    for (n, c, h, s), backend in [(shape, b) for shape in FUSE_SHAPES for b in backends if b in ('native', 'cpp')]:
        torch.manual_seed(0)
        layer = Involution(c, 7, s, backend=backend).to(device)
        x = torch.randn(n, c, h, h, device=device, requires_grad=True)

        def step(fuse):
            layer.fuse_span = fuse
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = layer(x)
            torch.autograd.grad(out, [x] + list(layer.parameters()), torch.ones_like(out))

        times = interleaved_times({'unfused': lambda: step(False), 'fused': lambda: step(True)}, args.repeats,
                                  device)
        t = med(times)
        kmap_bytes = n * layer.span.out_channels * (-(-h // s)) ** 2 * 4
        print(f'| {(n, c, h)}, {s} | {backend} | {fmt_mb(kmap_bytes)} | {t["unfused"] * 1e3:.1f} '
              f'({min(times["unfused"]) * 1e3:.1f}) '
              f'| {t["fused"] * 1e3:.1f} ({min(times["fused"]) * 1e3:.1f}) | {t["fused"] / t["unfused"]:.2f} '
              f'| {"fused" if kmap_bytes >= FUSE_MIN_BYTES[backend] else "unfused"} |', flush=True)


# model-only pseudo backend suffixes: '<backend>-fused' / '<backend>-unfused' (native or cpp) = the span conv fused
# into the aggregation (rednet.ops.fused) everywhere or nowhere; a plain backend uses the default (fuse_span=None:
# fused where the kernel map outgrows the cache)
FUSE_SUFFIXES = {'-unfused': False, '-fused': True}


class _FreeAggregation(torch.autograd.Function):
    """Stand-in for the aggregation that costs (almost) nothing: returns the input subsampled by the stride and
    a zero kernel-map gradient, so the kernel generator still runs forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, stride):
        ctx.shapes, ctx.stride = (x.shape, weight.shape), stride
        return x[:, :, ::stride, ::stride]

    @staticmethod
    def backward(ctx, grad_out):
        (x_shape, w_shape), s = ctx.shapes, ctx.stride
        if s == 1:
            gx = grad_out
        else:
            gx = grad_out.new_zeros(x_shape)
            gx[:, :, ::s, ::s] = grad_out
        return gx, grad_out.new_zeros(()).expand(w_shape), None


def _free_aggregation(self, x):
    weight = self.span(self.reduce(self.pool(x)))
    return _FreeAggregation.apply(x, weight, self.stride)


def _free_involution(self, x):
    return x[:, :, ::self.stride, ::self.stride]


# model-only lower-bound variants (--bounds): every involution layer replaced by a free stand-in, to show what
# RedNet would cost if the aggregation (or the whole involution, kernel generator included) took no time
BOUNDS = {'bound: free aggregation': _free_aggregation, 'bound: free involution': _free_involution}


def build_model(name: str, backend: str, small_input: bool = False):
    import timm
    if name == 'resnet50':
        import torchvision
        return torchvision.models.resnet50()
    if name.startswith('rednet') and backend in BOUNDS:
        import types
        from rednet.model import Involution
        model = timm.create_model(name, small_input=small_input)
        for mod in model.modules():
            if isinstance(mod, Involution):
                mod.forward = types.MethodType(BOUNDS[backend], mod)
        return model
    if name.startswith('rednet'):
        fuse = None
        for suffix, value in FUSE_SUFFIXES.items():
            if backend.endswith(suffix):
                backend, fuse = backend[:-len(suffix)], value
        # fuse None = the default; True/False: span conv fused into the aggregation everywhere or nowhere
        return timm.create_model(name, involution_backend=backend, small_input=small_input, fuse_span=fuse)
    return timm.create_model(name)


def bench_models(args, device, dtype, backends) -> None:
    batch, size = args.batch, args.img_size
    amp = dtype != torch.float32
    options = INDUCTOR_OPTIONS.get(device.type) if args.compile else None
    mode = ('compiled' + (f' with {options}' if options else '') if args.compile else 'eager') \
        + (f', autocast {dtype_name(dtype)}' if amp else ', float32') \
        + (', channels_last' if args.channels_last else '')
    stem = ', RedNets with the small-input stem' if args.small_input else ''
    print(f'\n### Whole models, batch {batch}, {size}x{size}{stem}, {mode}, {device_desc(device)}\n')
    variants = []
    for name in args.models.split(','):
        if name.startswith('rednet'):
            variants += [(name, b) for b in backends if b != 'auto']
            if args.bounds:
                variants += [(name, b) for b in BOUNDS]
        else:
            variants.append((name, None))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    train_fns, infer_fns, labels = {}, {}, {}
    for name, b in variants:
        key = name if b is None else f'{name} ({b})'
        model = build_model(name, b, args.small_input).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fwd = torch.compile(model, options=options) if args.compile else model

        def train_step(model=model, fwd=fwd, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()

        def infer(model=model, fwd=fwd):
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return fwd(x)

        try:
            t0 = time.time()
            train_step()
            sync(device)
            t1 = time.time()
            infer()
            sync(device)
            if args.compile:  # the first calls compile (train graph, then the eval graph)
                print(f'(compile {key}: train {t1 - t0:.0f} s, inference {time.time() - t1:.0f} s)', flush=True)
        except (ValueError, RuntimeError) as e:
            print(f'(skipping {key}: {str(e)[:100]})')
            continue
        train_fns[key], infer_fns[key], labels[key] = train_step, infer, name
    all_train = interleaved_times(train_fns, args.model_repeats, device)
    all_infer = interleaved_times(infer_fns, args.model_repeats, device)
    t_train, t_infer = med(all_train), med(all_infer)
    best_train = {k: min(v) for k, v in all_train.items()}
    best_infer = {k: min(v) for k, v in all_infer.items()}
    base = 'resnet50' if 'resnet50' in t_train else None
    print('| model | train img/s | inference img/s | train vs ResNet-50 | inference vs ResNet-50 '
          '| best-of train / inference vs ResNet-50 | train peak MB | inference peak MB | train peak vs ResNet-50 |')
    print('|---|---|---|---|---|---|---|---|---|')
    peaks = {k: (peak_bytes(train_fns[k], device), peak_bytes(infer_fns[k], device)) for k in train_fns}
    for k in train_fns:
        tr, inf = batch / t_train[k], batch / t_infer[k]
        r_tr = f'{t_train[base] / t_train[k]:.2f}' if base else '-'
        r_inf = f'{t_infer[base] / t_infer[k]:.2f}' if base else '-'
        r_mem = f'{peaks[k][0] / peaks[base][0]:.2f}' if base else '-'
        r_best = f'{best_train[base] / best_train[k]:.2f} / {best_infer[base] / best_infer[k]:.2f}' if base else '-'
        print(f'| {k} | {tr:.2f} | {inf:.2f} | {r_tr} | {r_inf} | {r_best} | {fmt_mb(peaks[k][0])} '
              f'| {fmt_mb(peaks[k][1])} '
              f'| {r_mem} |', flush=True)


# ---------------------------------------------------------------------------------------------------------
# --deploy: each ResNet / RedNet pair in the runtimes a deployment uses

DEPLOY_PAIRS = (('resnet50', 'rednet50'), ('resnet26', 'rednet26'))
DEPLOY_RUNTIMES = ('eager', 'torch.compile', 'AOTInductor', 'ONNX Runtime')
# the bound of any ONNX formulation of the aggregation: every aggregation replaced by the cheapest op that still
# consumes the kernel map (so the kernel generator is not pruned from the graph)
DEPLOY_BOUND = 'bound: free aggregation'


def _load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_aggregation_deploy(self, x):
    weight = self.span(self.reduce(self.pool(x)))
    return x[:, :, ::self.stride, ::self.stride] * weight[:, :1]


def _deploy_model(name: str, small_input: bool):
    import types
    from rednet.model import Involution
    if name.endswith(f'({DEPLOY_BOUND})'):
        model = build_model(name.split(' ')[0], 'auto', small_input)
        for mod in model.modules():
            if isinstance(mod, Involution):
                mod.forward = types.MethodType(_free_aggregation_deploy, mod)
        return model.eval()
    return build_model(name, 'auto', small_input).eval()


def deploy_runner(model, runtime: str, x: torch.Tensor, workdir: str):
    """(a no-grad inference callable on x, seconds to compile or export it, bytes of its file or None); the
    compile time of torch.compile is its first call."""
    from pathlib import Path
    export = _load_script('export')
    t0 = time.perf_counter()
    size = None
    if runtime == 'eager':
        fn = model
    elif runtime == 'torch.compile':
        fn = torch.compile(model)
        with torch.no_grad():
            fn(x)
    elif runtime == 'AOTInductor':
        path = os.path.join(workdir, f'model{len(os.listdir(workdir))}.pt2')
        export.export_aoti(model, x, Path(path), {}, False)
        fn, size = torch._inductor.aoti_load_package(path), os.path.getsize(path)
    else:
        import onnxruntime as ort
        path = os.path.join(workdir, f'model{len(os.listdir(workdir))}.onnx')
        export.export_onnx(model, x, Path(path), {}, False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
        sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        fn, size = (lambda _x: sess.run(None, feed)), os.path.getsize(path)
    seconds = time.perf_counter() - t0 if runtime != 'eager' else 0.0

    def infer():
        with torch.no_grad():
            return fn(x)
    return infer, seconds, size


def bench_deploy(args) -> None:
    """One table: ResNet vs RedNet of the same depth, inference, per runtime (img/s, ratio, compile/export time,
    file size); with --bounds also RedNet in ONNX Runtime with free aggregations."""
    import tempfile
    pairs = [p for p in DEPLOY_PAIRS if p[0] in args.models.split(',') or p[1] in args.models.split(',')]
    runtimes = [r for r in DEPLOY_RUNTIMES if r in args.runtimes.split(',')] if args.runtimes else DEPLOY_RUNTIMES
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
    print(f'\n### Deployment: inference, batch {args.batch}, {args.img_size}x{args.img_size}, float32, '
          f'{device_desc(torch.device("cpu"))}\n', flush=True)
    variants = [(name, rt) for pair in pairs for rt in runtimes for name in pair]
    if args.bounds:
        variants += [(f'{red} ({DEPLOY_BOUND})', 'ONNX Runtime') for _, red in pairs]
    fns, setup, sizes = {}, {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, rt in variants:
            try:
                fns[name, rt], setup[name, rt], sizes[name, rt] = deploy_runner(
                    _deploy_model(name, args.small_input), rt, x, workdir)
            except Exception as e:  # one runtime failing leaves the rest of the table
                print(f'(skipping {name}, {rt}: {type(e).__name__}: {str(e)[:200]})', flush=True)
                continue
            print(f'({name}, {rt}: ready in {setup[name, rt]:.0f} s; {load_desc()})', flush=True)
        times = med(interleaved_times(fns, args.model_repeats, torch.device('cpu')))
    ips = {k: args.batch / t for k, t in times.items()}
    print('\n| models | runtime | ResNet img/s | RedNet img/s | RedNet / ResNet '
          '| compile or export s (ResNet / RedNet) | file MB (ResNet / RedNet) |')
    print('|---|---|---|---|---|---|---|')
    mb = (lambda b: '-' if b is None else f'{b / 2 ** 20:.1f}')
    for res, red in pairs:
        for rt in runtimes:
            r, d = (res, rt), (red, rt)
            if r not in ips or d not in ips:
                continue
            print(f'| {res} / {red} | {rt} | {ips[r]:.1f} | {ips[d]:.1f} | {ips[d] / ips[r]:.2f}x '
                  f'| {setup[r]:.0f} / {setup[d]:.0f} | {mb(sizes[r])} / {mb(sizes[d])} |')
        bound = (f'{red} ({DEPLOY_BOUND})', 'ONNX Runtime')
        if bound in ips and (res, 'ONNX Runtime') in ips:
            base = ips[res, 'ONNX Runtime']
            print(f'| {res} / {red} ({DEPLOY_BOUND}) | ONNX Runtime | {base:.1f} | {ips[bound]:.1f} '
                  f'| {ips[bound] / base:.2f}x | - / {setup[bound]:.0f} | - / {mb(sizes[bound])} |')


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def device_desc(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'],
                   help='operator inputs; for models: autocast dtype (float32 = no autocast)')
    p.add_argument('--batch', type=int, default=8, help='batch of the model benchmark')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--models', default='resnet50,resnet26,rednet26,rednet50')
    p.add_argument('--backends', default=None,
                   help='comma-separated involution backends (default: reference, native, and cpp on the CPU or '
                        'triton on CUDA); for the models also <backend>-fused / <backend>-unfused, e.g. '
                        'cpp-fused (span conv fused into the aggregation everywhere or nowhere)')
    p.add_argument('--bounds', action='store_true',
                   help='add lower-bound RedNet variants whose involutions (or just their aggregation) cost '
                        'nothing: the fastest any involution kernel could make the model')
    p.add_argument('--compile', action='store_true', help='torch.compile the models (slow to compile on CPU)')
    p.add_argument('--channels-last', action='store_true', help='models and inputs in channels_last')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    p.add_argument('--repeats', type=int, default=5, help='timed repeats per operator measurement')
    p.add_argument('--model-repeats', type=int, default=3, help='timed repeats per model measurement')
    only = p.add_mutually_exclusive_group()
    p.add_argument('--small-input', action='store_true',
                   help='RedNets with the 32x32 stem (small_input=True; use with e.g. --img-size 32 --batch 64)')
    only.add_argument('--ops-only', action='store_true')
    only.add_argument('--models-only', action='store_true')
    only.add_argument('--fuse-only', action='store_true',
                      help='only the table of one involution layer with the span conv fused vs unfused')
    only.add_argument('--deploy', action='store_true',
                      help='only the deployment table: each ResNet/RedNet pair of --models in eager, torch.compile, '
                           'AOTInductor and ONNX Runtime (inference; compiles take minutes on a small CPU)')
    p.add_argument('--runtimes', default=None, help='with --deploy: a comma-separated subset of ' +
                   ','.join(DEPLOY_RUNTIMES))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.backends:
        backends = args.backends.split(',')
    else:
        backends = ['reference', 'native'] + (['triton'] if device.type == 'cuda' else ['cpp'])
    print(f'torch {torch.__version__}, {device_desc(device)}, dtype {args.dtype}, backends {",".join(backends)}, '
          f'{load_desc()}')
    t0 = time.time()
    if args.deploy:
        bench_deploy(args)
        print(f'\n({time.time() - t0:.0f} s; {load_desc()})')
        return
    everything = not (args.ops_only or args.models_only or args.fuse_only)
    if everything or args.ops_only:
        bench_ops(args, device, dtype, backends)
    if everything or args.fuse_only:
        bench_fuse(args, device, dtype, backends)
    if everything or args.models_only:
        bench_models(args, device, dtype, backends)
    print(f'\n({time.time() - t0:.0f} s; {load_desc()})')


def load_desc() -> str:
    # other processes on the machine distort CPU timings badly (every parallel region waits for a descheduled
    # thread), so the load is printed with the results
    try:
        return 'load average %.2f' % os.getloadavg()[0]
    except OSError:
        return 'load average n/a'


if __name__ == '__main__':
    main()
