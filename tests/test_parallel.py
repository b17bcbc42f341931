# tests/test_parallel.py: plumbing/parallel.py: two processes under torchrun compute what one process with two
# micro-batches does (adapters, logged losses, a stop and --resume), a batch that cannot be shared evenly among
# the processes is refused before training, ranks whose flags or inputs differ from rank 0's are refused, and the
# survivor of a killed rank says one line.

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train_nlg
import train_nlu
from plumbing import parallel

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


@pytest.mark.parametrize("script", ["nlu", "nlg"])
@slow
def test_two_processes_under_torchrun_equal_one_process_with_two_micro_batches(encoders, files, tiny_llama, tmp_path,
                                                                                script):
    # 2 ranks x (batch 8, grad-accum 1) against 1 process x (batch 8, grad-accum 2): the same global batches,
    # the same micro-batches (rank r's share = micro-batch r), the same dropout masks and range-finder draws,
    # so the same adapters after 3 BA-LoRA steps and the same logged losses (NLG's through a stop and a --resume
    # under torchrun). The NLU encoder has dropout 0.1.
    common = ["--method", "balora", "--batch-size", "8", "--max-steps", "3", "--threads", "1"]
    if script == "nlu":
        make = lambda out, accum: argv(encoders["dropout"], files, out, *common, "--grad-accum", accum)
        single = train_nlu.main(make(tmp_path / "one", "2"))
    else:
        make = lambda out, accum: cli(tiny_llama, out, *common, "--grad-accum", accum, "--lr", "1e-3")
        single = train_nlg.main(make(tmp_path / "one", "2"))
    # two ranks; NLG's stopped after step 2 and resumed (every rank resumes from rank 0's checkpoint: the same
    # plumbing for both scripts, so one of them goes through it)
    if script == "nlg":
        torchrun(f"train_{script}.py", make(tmp_path / "two", "1") + ["--stop-after", "2"])
    r = torchrun(f"train_{script}.py", make(tmp_path / "two", "1") + (["--resume"] if script == "nlg" else []))
    assert r.stdout.count("step 3/3") == 1  # one console: rank 1 prints nothing
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    terms = {"task", "consistency", "diversity", "svd", "loss", "lambda1", "lambda2", "lambda3", "grad_norm"}
    assert {"task", "consistency", "svd", "grad_norm"} <= set(one[-1])
    for r1, r2 in zip(one, two):
        assert terms & set(r1) == terms & set(r2)
        for t in terms & set(r1):
            assert r2[t] == pytest.approx(r1[t], rel=1e-5, abs=1e-6), (r1["step"], t)
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["machine"]["world_size"] == 2
    if script == "nlu":
        assert m2["test"]["accuracy"] == single["test"]["accuracy"]
        assert m2["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-5)
    else:
        assert m2["tuned"]["val_ppl"] == pytest.approx(single["tuned"]["val_ppl"], rel=1e-5)


def test_torchrun_refuses_a_batch_it_cannot_share_evenly(encoders, files, tmp_path):
    with pytest.raises(ValueError, match="not divisible by 2 processes"):
        parallel.check_world(40, 6, 2, 2, 10)
    with pytest.raises(ValueError, match="last step has 1 of the 41"):
        parallel.check_world(41, 8, 1, 2, 10)
    parallel.check_world(41, 8, 1, 2, 5)  # --max-steps ends before the short step: fine
    parallel.check_world(41, 8, 1, 1, 10)  # one process: anything goes
    assert data.shard(list(range(8)), 1, 2) == [4, 5, 6, 7] and data.shard([1, 2], 0, 1) == [1, 2]


def test_one_process_is_a_world_of_one_and_the_seed_depends_on_the_micro_batch_alone():
    one = parallel.Dist()
    assert (one.rank, one.world, one.main) == (0, 1, True) and not parallel.Dist(1, 2).main
    net = torch.nn.Linear(2, 2)
    assert parallel.data_parallel(net, one) is net and parallel.all_sum({"n": 3.0}, one) == {"n": 3.0}
    with parallel.sync_gradients(net, last=False):  # a plain module accumulates locally: nothing to switch off
        pass
    # one seed per (run seed, optimizer step, micro-batch index in the step's global batch), whatever the layout
    seeds = {parallel.step_seed(s, t, m) for s in range(3) for t in range(50) for m in range(8)}
    assert len(seeds) == 3 * 50 * 8


AGREE_WORKER = '''
import json, sys
from pathlib import Path
sys.path[:0] = [{here!r}]
import torch
from plumbing import checkpoints, errors, parallel
torch.distributed.init_process_group("gloo")
rank, tmp, out = torch.distributed.get_rank(), Path({tmp!r}), {{}}

def attempt(name, fn):
    try:
        fn()
        out[name] = None
    except errors.InputError as e:
        out[name] = [str(e), e.quiet]
attempt("same flags", lambda: parallel.agree({{"lr": ("--lr 0.1", "0.1")}}, "flags"))
attempt("other flags", lambda: parallel.agree({{"lr": (f"--lr {{rank}}", str(rank))}}, "flags"))
attempt("same input", lambda: checkpoints.fingerprints([tmp / "shared.jsonl", None, tmp / "model"]))
attempt("other input", lambda: checkpoints.fingerprints([tmp / f"train{{rank}}.jsonl", tmp / "model"]))
(tmp / f"result{{rank}}.json").write_text(json.dumps(out))
torch.distributed.destroy_process_group()
'''


@slow
def test_ranks_whose_flags_or_inputs_differ_from_rank_0s_are_refused_by_rank_0_naming_both(tmp_path):
    # Two gloo processes under torchrun: equal flags and inputs pass; a flag or an input file that differs on rank 1
    # (another node's file at the same path: here, another file) is one line from rank 0 naming rank 1 and both
    # sides, and rank 1 exits 1 without a line of its own
    import subprocess
    (tmp_path / "shared.jsonl").write_text('{"sentence": "good", "label": "pos"}\n')
    (tmp_path / "train0.jsonl").write_text('{"sentence": "good", "label": "pos"}\n')
    (tmp_path / "train1.jsonl").write_text('{"sentence": "good", "label": "neg"}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    worker = tmp_path / "worker.py"
    worker.write_text(AGREE_WORKER.format(here=str(HERE), tmp=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in (0, 1)]
    assert [x["same flags"] for x in res] == [None, None] and [x["same input"] for x in res] == [None, None]
    msg, quiet = res[0]["other flags"]
    assert msg == ("rank 1 and rank 0 disagree on the flags: rank 1 has --lr 1, rank 0 has --lr 0; every process of "
                   "one torchrun run must use the same flags"), msg
    assert not quiet and res[1]["other flags"][1] is True and res[1]["other flags"][0] == msg
    msg, quiet = res[0]["other input"]
    assert msg.startswith("rank 1 and rank 0 disagree on the input files: rank 1 has "
                          f"{tmp_path / 'train1.jsonl'} (size 37, sha256 ") and f"rank 0 has {tmp_path / 'train0.jsonl'}" \
        in msg and not quiet, msg
    assert res[1]["other input"][1] is True


@slow
def test_the_surviving_rank_of_a_killed_one_says_one_line_and_exits_1(encoders, files, tmp_path):
    # a rank killed mid-run (SIGKILL: out of memory, a node lost): the other rank's gloo collective fails, or
    # torchrun stops it with SIGTERM; either way one line and exit status 1, not a traceback from inside gloo
    import signal
    import subprocess
    import time
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train_nlu.py"), *argv(encoders["plain"], files, out, "--method", "balora", "--epochs", "400")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").exists()
                                              and (out / "log.jsonl").read_text().count("\n") >= 5):
            time.sleep(0.1)
        victim = None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"RANK=1" in environ and str(HERE / "train_nlu.py").encode() in cmdline \
                    and b"torch.distributed.run" not in cmdline:
                victim = int(pid)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    ours = [line for line in err.splitlines() if line.startswith("train_nlu.py: ")]
    assert len(ours) == 1 and ours[0].startswith("train_nlu.py: error: rank 0: "), err[-3000:]
    assert f'File "{HERE / "train_nlu.py"}"' not in err, err[-3000:]
    assert "exitcode  : 1 (pid" in err, err[-3000:]  # rank 0 in torchrun's report
