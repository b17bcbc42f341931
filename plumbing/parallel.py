# plumbing/parallel.py: several processes under torchrun (data parallel): this rank's Dist, the process group,
# the DistributedDataParallel wrapper and its once-per-step gradient sync, sums over the ranks, the per-micro-batch
# seed that makes N ranks equal one process, the check that every rank gets examples, and the check that every
# rank runs with the same flags, inputs and checkpoint (agree). Both training scripts, plumbing/devices.py (setup
# starts the group), plumbing/rundir.py and plumbing/checkpoints.py (agree) and experiments/bench.py (step_seed)
# import it; it imports plumbing/errors.py.

# `torchrun --nproc_per_node N train_nlu.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK, as in nanoGPT's train.py.
# Data parallel: every rank holds the whole model, takes a disjoint share of each step's batch, and
# DistributedDataParallel all-reduces the adapter (and head) gradients once per optimizer step. Without torchrun
# nothing here does anything.

import datetime
import math
import os
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

import plumbing.interrupts as interrupts
from plumbing.errors import Ended, InputError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self):  # rank 0: the one process that prints, logs, evaluates and writes files
        return self.rank == 0


def distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"  # one GPU per process
        torch.cuda.set_device(device)
    # Rank 0 evaluates alone (the base model, each validation) while the others wait in the next collective:
    # the timeout allows for a long evaluation.
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(hours=2))
    if rank:  # one console: the other ranks' prints go nowhere (their errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    if threading.current_thread() is threading.main_thread():
        # torchrun stops the other ranks with SIGTERM when one fails: one line each (errors.cli), not a silent death
        # or a traceback from inside a collective
        def ended(signum, frame):
            if not interrupts.in_main(frame):  # errors.cli is saying its line or leaving: let it
                return
            raise Ended(f"rank {rank}: stopped by SIGTERM (torchrun stops every process of the run when one of them "
                        f"fails, or when it is stopped itself); the failing process's message says why")
        signal.signal(signal.SIGTERM, ended)
    return Dist(rank, world, device)


def data_parallel(net, dist):
    # DDP over the trainable parameters; buffers (the teacher's A0/B0, RoPE tables) are equal on every rank and
    # never change, so they are not broadcast each forward; the gradients live in DDP's all-reduce buckets. The
    # unwrapped model stays `net` (teacher, evaluation, saving); the wrapper is only for the training forward.
    if dist.world == 1:
        return net
    ids = [dist.device] if dist.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)


def sync_gradients(net, last: bool):
    # DDP all-reduces the gradients in the backward of a step's last micro-batch only (nanoGPT's
    # require_backward_grad_sync; no_sync is the public switch); a plain module always accumulates locally
    return net.no_sync() if not last and hasattr(net, "no_sync") else nullcontext()


def all_sum(values: dict, dist) -> dict:
    # {name: float} summed over the ranks (the logged terms: each rank adds its weighted share)
    if dist.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def agree(items: dict, what: str):
    # Under torchrun, before anything is trained: every rank must run with rank 0's flags, inputs and checkpoint (a
    # file at the same path on another node may hold other data; a rank training on its own data would say nothing).
    # items: {key: (what to show, digest)}, the same keys on every rank. One all_gather of these small dicts; a key
    # whose digest differs from rank 0's is one line on rank 0 naming the rank and both sides, and every rank exits 1.
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {str(k): [str(v[0]), str(v[1])] for k, v in items.items()})
    ref = gathered[0]
    for r, other in enumerate(gathered[1:], 1):
        for k in sorted(set(ref) | set(other)):
            a, b = ref.get(k), other.get(k)
            if (a or [None, None])[1] != (b or [None, None])[1]:
                raise InputError(f"rank {r} and rank 0 disagree on the {what}: rank {r} has "
                                 f"{b[0] if b else f'no {k}'}, rank 0 has {a[0] if a else f'no {k}'}; every process "
                                 f"of one torchrun run must use the same {what}", quiet=rank != 0)


def step_seed(seed, step, micro):
    # The randomness of one micro-batch (dropout; NLG's range finder) depends only on (seed, optimizer step,
    # micro-batch index within the step's global batch), so N ranks x G micro-batches draw what one process
    # with N*G micro-batches draws, and a resumed run draws what an uninterrupted one did.
    return seed * 1_000_003 + step * 1009 + micro


def check_world(n: int, batch_size: int, grad_accum: int, world: int, steps: int):
    # Before training: every step must give every rank the same number of examples, and the epoch's last,
    # smaller step (when the run reaches it) at least one each: a rank with none would wait forever in the
    # gradient all-reduce.
    if world == 1:
        return
    if batch_size % (world * grad_accum):
        raise InputError(f"--batch-size {batch_size} (examples per optimizer step, all processes together) is not "
                         f"divisible by {world} processes x --grad-accum {grad_accum}")
    last = n % batch_size
    if last and steps > n // batch_size and math.ceil(last / math.ceil(last / world)) < world:
        raise InputError(f"the epoch's last step has {last} of the {n} training examples, too few to give each of "
                         f"{world} processes a share: choose another --batch-size, or a --max-steps that ends sooner")
