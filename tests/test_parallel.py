# tests/test_parallel.py: plumbing/parallel.py: two processes under torchrun compute what one process with two
# micro-batches does (adapters, logged losses, a stop and --resume), and a batch that cannot be shared evenly among
# the processes is refused before training.

import json

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
    # so the same adapters after 3 BA-LoRA steps and the same logged losses. The NLU encoder has dropout 0.1.
    common = ["--method", "balora", "--batch-size", "8", "--max-steps", "3", "--threads", "1"]
    if script == "nlu":
        make = lambda out, accum: argv(encoders["dropout"], files, out, *common, "--grad-accum", accum)
        single = train_nlu.main(make(tmp_path / "one", "2"))
    else:
        make = lambda out, accum: cli(tiny_llama, out, *common, "--grad-accum", accum, "--lr", "1e-3")
        single = train_nlg.main(make(tmp_path / "one", "2"))
    r = torchrun(f"train_{script}.py", make(tmp_path / "two", "1"))
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
    # every rank resumes from rank 0's checkpoint: stopped after step 2 and resumed = uninterrupted
    torchrun(f"train_{script}.py", make(tmp_path / "three", "1") + ["--stop-after", "2"])
    torchrun(f"train_{script}.py", make(tmp_path / "three", "1") + ["--resume"])
    c = load_file(str(tmp_path / "three" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(c[k], b[k]) for k in b)
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
