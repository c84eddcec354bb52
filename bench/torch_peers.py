#!/usr/bin/env python3
"""PyTorch peers of tunefuse's fused ops, at the shapes of `tunefuse bench`.

Times PyTorch eager and torch.compile for each op (forward + backward where
the fused op has one) with CUDA events, and writes JSON that
`tunefuse table --peers` merges into the results table:
    {"device": ..., "torch": ..., "results": [{op, shape, dtype, eager_ms, compile_ms}]}
The math matches src/bench.rs's candle-composed baselines. For the AdamW
step the two columns are torch.optim.AdamW's own implementations over the
same 103 MiniLM-shaped f32 tensors: "eager" the default multi-tensor
(foreach) update, "compile" the fused=True CUDA kernel (PyTorch's fastest;
nothing is torch.compile'd in that row).
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, iters=20, reps=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2]


def sym_kl(a, b):
    """Symmetric KL, batchmean, computed in f32 (as the fused op accumulates)."""
    la = F.log_softmax(a.float(), dim=-1)
    lb = F.log_softmax(b.float(), dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum() / a.shape[0]


def mixout(w, u, p):
    m = (torch.rand_like(w) >= p).to(w.dtype)
    return u + m * (w - u) / (1.0 - p)


def ascent_step(delta, grad, mask, eta=1e-3, eps=1e-2):
    """pgd / l2 / token: delta + eta g/|g|, projected onto the eps-ball, padding zeroed."""
    x = delta.float() + eta * grad.float() / grad.float().norm(dim=-1, keepdim=True)
    k = (eps / x.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    return (x * k * mask[..., None]).to(delta.dtype)


def noise_init(mask, shape, sigma=1e-5):
    return torch.randn(shape, device=mask.device) * sigma * mask[..., None]


def dropout(x):
    return F.dropout(x, 0.1, training=True)


def adapter(x, wd, bd, wu, bu):
    """Houlsby bottleneck with GELU (erf) and the residual x, scale 1."""
    return x + F.linear(F.gelu(F.linear(x, wd, bd)), wu, bu)


def minilm_param_shapes():
    """all-MiniLM-L6-v2's 101 tensors plus a 2-class head, as src/bench.rs."""
    h = 384
    s = [(30522, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(6):
        for _ in range(4):
            s += [(h, h), (h,)]
        s += [(4 * h, h), (4 * h,), (h, 4 * h), (h,), (h,), (h,), (h,), (h,)]
    return s + [(2, h), (2,)]


def adamw_times(dev):
    """(foreach ms, fused ms) of one AdamW step (wd 0.01, grads set once)."""
    out = []
    for kind in ("foreach", "fused"):
        try:
            params = [torch.nn.Parameter(0.02 * torch.randn(*s, device=dev)) for s in minilm_param_shapes()]
            for p in params:
                p.grad = 1e-3 * torch.randn_like(p)
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **{kind: True})
            out.append(time_ms(opt.step))
        except Exception as e:
            print(f"adamw ({kind}) failed: {e}", file=sys.stderr)
            out.append(None)
    return out


def both(name, make_step):
    """(eager ms, compile ms) for a step built from an op function."""
    out = []
    for compiled in (False, True):
        try:
            step = make_step(compiled)
            out.append(time_ms(step))
        except Exception as e:  # report and go on: one failed compile must not lose the rest
            print(f"{name} ({'compile' if compiled else 'eager'}) failed: {e}", file=sys.stderr)
            out.append(None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_peers: no CUDA device", file=sys.stderr)
        return 1
    dev = "cuda"
    results = []

    def record(op, shape, dtype, times):
        eager, comp = times
        results.append(dict(op=op, shape=shape, dtype=dtype, eager_ms=eager, compile_ms=comp))
        print(f"{op} {shape} {dtype}: eager {eager} ms, compile {comp} ms", flush=True)

    rows, v = 16384, 30522
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
        a = (3 * torch.randn(rows, v, device=dev)).to(dtype).requires_grad_()
        b = (3 * torch.randn(rows, v, device=dev)).to(dtype).requires_grad_()

        def make(compiled, a=a, b=b):
            f = torch.compile(sym_kl) if compiled else sym_kl

            def step():
                a.grad = None
                b.grad = None
                f(a, b).backward()

            return step

        record("sym_kl fwd+bwd", f"{rows}x{v}", name, both("sym_kl", make))
        del a, b
        torch.cuda.empty_cache()

    n = 110_000_000
    w = (0.02 * torch.randn(n, device=dev)).requires_grad_()
    u = 0.02 * torch.randn(n, device=dev)
    g = torch.randn(n, device=dev)

    def make_mix(compiled):
        f = torch.compile(mixout) if compiled else mixout

        def step():
            w.grad = None
            f(w, u, 0.1).backward(g)

        return step

    record("mixout fwd+bwd", f"{n}", "f32", both("mixout", make_mix))
    del w, u, g
    torch.cuda.empty_cache()

    b, l, h = 32, 512, 768
    mask = torch.ones(b, l, device=dev)
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        delta = (0.01 * torch.randn(b, l, h, device=dev)).to(dtype)
        grad = torch.randn(b, l, h, device=dev).to(dtype)

        def make_step(compiled, delta=delta, grad=grad):
            f = torch.compile(ascent_step) if compiled else ascent_step
            return lambda: f(delta, grad, mask)

        record("ascent step pgd l2 token", f"{b}x{l}x{h}", name, both("ascent_step", make_step))

    def make_noise(compiled):
        f = torch.compile(noise_init, dynamic=False) if compiled else noise_init
        return lambda: f(mask, (b, l, h))

    record("noise init normal", f"{b}x{l}x{h}", "f32", both("noise_init", make_noise))

    x = torch.randn(32, 128, 768, device=dev).to(torch.bfloat16)

    def make_drop(compiled):
        f = torch.compile(dropout) if compiled else dropout
        return lambda: f(x)

    record("dropout fwd", "32x128x768", "bf16", both("dropout", make_drop))
    del x
    torch.cuda.empty_cache()

    t, r = 16384, 64
    for d in (768, 1024):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            def mk(shape, std):
                return (std * torch.randn(*shape, device=dev)).to(dtype).requires_grad_()

            params = [mk((t, d), 1.0), mk((r, d), 0.03), mk((r,), 0.01), mk((d, r), 0.1), mk((d,), 0.01)]
            dy = torch.randn(t, d, device=dev).to(dtype)

            def make_adapter(compiled, params=params, dy=dy):
                f = torch.compile(adapter) if compiled else adapter

                def step():
                    for p in params:
                        p.grad = None
                    f(*params).backward(dy)

                return step

            record("adapter fwd+bwd", f"{t}x{d} r{r}", name, both("adapter", make_adapter))

    t, h = 16384, 384
    x = torch.randn(t, h, device=dev).to(torch.bfloat16).requires_grad_()
    lw = (1 + 0.1 * torch.randn(h, device=dev)).to(torch.bfloat16).requires_grad_()
    lb = (0.1 * torch.randn(h, device=dev)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(t, h, device=dev).to(torch.bfloat16)

    def make_ln(compiled):
        # bf16 weight and bias: F.layer_norm takes one dtype (ours: f32 weights).
        f = torch.compile(F.layer_norm, dynamic=False) if compiled else F.layer_norm

        def step():
            x.grad = lw.grad = lb.grad = None
            f(x, (h,), lw, lb, 1e-12).backward(dy)

        return step

    record("layer_norm fwd+bwd", f"{t}x{h}", "bf16", both("layer_norm", make_ln))
    del x, dy
    torch.cuda.empty_cache()

    record("adamw step", f"minilm {len(minilm_param_shapes())} tensors", "f32", adamw_times(dev))

    doc = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, results=results)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
