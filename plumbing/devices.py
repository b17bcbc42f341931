# plumbing/devices.py: where a training script runs: the device (one line if it cannot be used), the autocast
# dtype (bf16 only where the device runs it natively) and the machine record every result carries, and setup(),
# which settles threads, device, torchrun and dtype before anything is loaded. Both training scripts and
# experiments/bench.py import it; it imports plumbing/parallel.py (torchrun's start) and plumbing/errors.py.

# bf16 pays only where the matmuls run natively in it: on a GPU with bf16 units (compute capability >= 8.0; a T4
# or V100 emulates it, slowly), on a CPU with AVX512-BF16 or AMX *and* torch using them. On an AVX2 CPU torch has
# no fast bf16 matmul (pytorch issues #118499, #111456), so `auto` is fp32 there.

from contextlib import nullcontext
from pathlib import Path

import torch

from plumbing.errors import InputError
from plumbing.parallel import distributed


def pick_device(requested):
    # the device string, or one line saying why it cannot be used (before anything is loaded)
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise InputError(f"--device {requested}: not a device (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {requested}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {requested}: the scripts run on cpu, cuda or mps")
    return requested


def _probe(name):
    # torch's private CPU probes, guarded: a torch without them (or one that raises) counts as "no"
    try:
        return bool(getattr(torch.cpu, name)())
    except Exception:
        return False


def cpu_bf16_native():
    # -> (bool, reason). Follows what torch will use, not only the CPU's flags: ATEN_CPU_CAPABILITY and
    # ONEDNN_MAX_CPU_ISA lower both, which is how an AMX machine is tested as an AVX2 one.
    cap = torch.backends.cpu.get_cpu_capability()
    amx, avx512_bf16 = _probe("_is_amx_tile_supported"), _probe("_is_avx512_bf16_supported")
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        onednn = False
    if not (amx or avx512_bf16):
        return False, f"this CPU has no native bf16 matmul ({cap}, no AVX512-BF16 or AMX)"
    if cap != "AVX512" or not onednn:
        return False, f"torch runs this CPU without its bf16 units ({cap}, oneDNN bf16 {onednn})"
    return True, f"this CPU runs bf16 matmuls natively ({cap} with {'AMX' if amx else 'AVX512-BF16'})"


def cuda_bf16_native(device):
    # native bf16 tensor cores from Ampere on (compute capability 8.0); is_bf16_supported() alone also counts
    # emulation (a T4 at 7.5 says True), so the capability decides
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return True, f"{name} (compute capability {major}.{minor}) runs bf16 natively"
    return False, f"{name} (compute capability {major}.{minor}) only emulates bf16"


def resolve_dtype(requested, device):
    # "auto" | "bf16" | "fp32" -> ("bf16" | "fp32", one line saying what was chosen and why)
    device = torch.device(device)
    if device.type == "cuda":
        native, reason = cuda_bf16_native(device)
    elif device.type == "mps":
        native, reason = False, "MPS: bf16 autocast depends on the macOS version, so auto stays fp32"
    else:
        native, reason = cpu_bf16_native()
    if requested == "auto":
        chosen = "bf16" if native else "fp32"
        return chosen, f"dtype auto -> {chosen}: {reason}" + ("" if native else "; --dtype bf16 forces it")
    if requested == "bf16" and not native:
        return "bf16", f"warning: --dtype bf16 on a device without native bf16 will be much slower: {reason}"
    return requested, f"dtype {requested} (as asked; {reason})"


def setup(args, default_model):
    # threads, device (one line if it cannot be used), torchrun, the autocast dtype (its reason is the first log
    # line), and args.model: a --model that names a file is one line, none is the script's default model
    # (default_model() fetches it once); before anything is loaded. Returns this process's Dist.
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = distributed(pick_device(args.device))  # torchrun: this rank's device; else one process
    args.device = dist.device
    args.dtype, why = resolve_dtype(args.dtype, args.device)
    print(why, flush=True)
    if args.model and not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: not a model directory (config.json, model.safetensors, "
                         f"tokenizer.json)")
    args.model = str(args.model or default_model())
    return dist


def autocast(device, dtype):
    # the forward's autocast context: bf16 when chosen, else nothing (float32)
    if dtype != "bf16":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def machine(device, dtype, threads=None):
    # what every result records next to its numbers (metrics.json, log.jsonl, bench.json)
    device = torch.device(device)
    rec = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_bf16_native": cpu_bf16_native()[0], "threads": threads or torch.get_num_threads(),
           "torch": torch.__version__, "device": str(device), "dtype": dtype}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rec["world_size"] = torch.distributed.get_world_size()
    return rec
