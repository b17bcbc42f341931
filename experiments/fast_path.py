# experiments/fast_path.py: where balora.regularizers' fast path (Part 3 of balora.py) pays. For each logits shape,
# one forward + backward of the three terms (each task's forms), as written (plain=True) and through the fast path
# at any width: the median time of REPEATS, and the new tensors of M×V elements or more that they allocate (each
# M×V·4 bytes; counted from M×V = 2^16 on, below which any small temporary would count). The shapes: the default NLU
# batch (32 × 2 classes), V = 256 and V = 1 024 (the rule's edge), and the default NLG micro-batch (~128 × 49 152).
# Run: `python experiments/fast_path.py` (seconds). It backs balora.FUSE_MIN_COLUMNS.

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, one level up
import balora  # noqa: E402

REPEATS = 7
SHAPES = [("NLU default", "nlu", 32, 2), ("NLU, V = 256", "nlu", 32, 256), ("NLU, V = 1 024", "nlu", 32, 1024),
          ("NLG, V = 256", "nlg", 128, 256), ("NLG, V = 1 024", "nlg", 128, 1024), ("NLG default", "nlg", 128, 49152)]


class Allocations(TorchDispatchMode):
    # the element counts of every new storage an op returns
    def __init__(self):
        super().__init__()
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t):
                self.sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // 4
        return out


def step(cfg, z0, zt, plain):
    z = z0.clone().requires_grad_(True)
    total, _ = balora.regularizers(cfg, z, zt, generator=torch.Generator().manual_seed(0), plain=plain)
    total.backward()


def measure(task, M, V):
    g = torch.Generator().manual_seed(0)
    z0, zt = torch.randn(M, V, generator=g) * 3, torch.randn(M, V, generator=g) * 3
    preset = balora.BALoRAConfig.nlu if task == "nlu" else balora.BALoRAConfig.nlg
    k = min(5 if task == "nlu" else 10, V - 1)  # (train_nlu.py's k = D − 1 on two classes)
    cfg = preset(svd_k=k, lambda1_schedule="constant", focus_schedule="constant")
    out = {}
    for plain in (True, False):
        times = []
        for _ in range(REPEATS + 1):
            t0 = time.perf_counter()
            step(cfg, z0, zt, plain)
            times.append(time.perf_counter() - t0)
        with Allocations() as seen:
            step(cfg, z0, zt, plain)
        inputs = {z0.untyped_storage().data_ptr(), zt.untyped_storage().data_ptr()}
        buffers = sum(1 for p, n in seen.sizes.items() if p not in inputs and n >= M * V) if M * V >= 1 << 16 else "–"
        out[plain] = (statistics.median(times[1:]) * 1e3, buffers)
    return out


def main():
    torch.set_num_threads(2)
    rule, balora.FUSE_MIN_COLUMNS = balora.FUSE_MIN_COLUMNS, 1  # plain=False: the fast path at any width
    print(f"{'shape':<16} {'M x V':>13} | {'plain ms':>9} {'fast ms':>8} | M×V buffers plain / fast")
    for name, task, M, V in SHAPES:
        r = measure(task, M, V)
        print(f"{name:<16} {f'{M} x {V}':>13} | {r[True][0]:9.2f} {r[False][0]:8.2f} | {r[True][1]} / {r[False][1]}"
              f"{'   (regularizers takes the fast path)' if V >= rule else ''}")


if __name__ == "__main__":
    main()
