"""Outputs and gradients of 3 optimizer steps of an entries layer, saved so that two trees can be
compared bitwise: `PYTHONPATH=<tree> python bitwise.py OUT.pt` in each, then `python bitwise.py
--compare A.pt B.pt`. Cases: modes merged / split, fp32 and bf16 weights, autocast, sizes below and
above the small-weight bound (2^18 entries), tokens below and above the dense-gradient bound."""
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def run():
    import spft_kernels as spft

    results = {}
    for out_features, in_features, tokens in ((64, 64, 16), (96, 80, 300), (640, 512, 16), (640, 512, 300)):
        for mode in ("merged", "split"):
            for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
                torch.manual_seed(0)  # the bias's initialisation
                generator = torch.Generator().manual_seed(0)
                linear = torch.nn.Linear(in_features, out_features).to(dtype)
                with torch.no_grad():
                    linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
                index = spft.random_index(out_features, in_features, 0.05, generator=generator)
                layer = spft.SparseDeltaLinear.from_linear(linear, index, mode=mode)
                del linear
                optimizer = torch.optim.AdamW([layer.delta], lr=1e-2)
                x = torch.randn(tokens, in_features, generator=generator).to(dtype).requires_grad_(True)
                for step in range(3):
                    optimizer.zero_grad()
                    x.grad = None
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        y = layer(x)
                    y.float().square().mean().backward()
                    key = (out_features, in_features, tokens, mode, str(dtype), autocast, step)
                    results[key] = [y.detach().clone(), x.grad.clone(), layer.delta.grad.clone()]
                    optimizer.step()
    return results


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        small = 1 << 18
        for key in a:
            same = all(torch.equal(p, q) for p, q in zip(a[key], b[key]))
            worst = max((p.double() - q.double()).abs().max().item() for p, q in zip(a[key], b[key]))
            kind = "large" if key[0] * key[1] > small else "small"
            print(kind, key, "bitwise" if same else f"differs (max |diff| {worst:.3g})")
    else:
        torch.save(run(), sys.argv[1])
