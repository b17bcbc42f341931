# tests/test_checkpoints.py: plumbing/checkpoints.py: a --resume checks the checkpoint (its tensors, its JSON
# state, AdamW's state) and every input's fingerprint before anything is trained; Ctrl-C names the checkpoint a
# --resume continues from, and the resumed run ends where an uninterrupted one does; the header is read strictly, an
# unreadable checkpoint or a full disk is one line, and the run's files get the umask's mode.

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_nlu
from plumbing import checkpoints, errors

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


def test_checkpoint_files_are_checked_before_anything_is_trained(encoders, files, tmp_path):
    common = ("--epochs", "2", "--save-every", "2", "--method", "pissa")
    out = tmp_path / "r"
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--stop-after", "3")) is None
    ck = out / checkpoints.CHECKPOINT
    raw = ck.read_bytes()
    t = load_file(str(ck))
    from safetensors import safe_open
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    key = next(k for k in t if k.endswith("exp_avg"))
    save_file({**t, key: torch.zeros(3, 3)}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=rf"{re.escape(key)} has shape \(3, 3\)"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    state = json.loads(meta["train_state"])
    state.pop("step")
    save_file(t, str(ck), metadata={"train_state": json.dumps(state)})
    with pytest.raises(ValueError, match="'step'"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    ck.write_bytes(raw[:100])
    with pytest.raises(ValueError, match="checkpoint.safetensors: not a readable safetensors"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    # a second "step" in the JSON state (json.loads would keep the later one and skip steps silently)
    text = meta["train_state"]
    save_file(t, str(ck), metadata={"train_state": text[:-1] + ', "step": 1}'})
    with pytest.raises(ValueError, match="the key 'step' appears twice"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    # every optimizer tensor removed (a fresh AdamW would resume with exit 0), and AdamW's step not the run's
    save_file({k: v for k, v in t.items() if not k.startswith("opt.")}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=r"the optimizer state of parameter 0 has \[\], it needs"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    save_file({k: (v + 1 if k.endswith(".step") else v) for k, v in t.items()}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=r"opt\.0\.step is 4\.0, the run is at step 3"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    save_file(t, str(ck), metadata=meta)  # the untouched checkpoint resumes
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))["steps"] == 10


def test_resume_refuses_a_changed_input_file_by_name(encoders, files, tmp_path):
    # every label of the training file flipped between a stop and its --resume: refused, naming the file
    train = tmp_path / "train.jsonl"
    shutil.copy(files["train"], train)
    own = {**files, "train": train}
    common = ("--epochs", "2", "--method", "pissa", "--save-every", "2")
    assert train_nlu.main(argv(encoders["plain"], own, tmp_path / "r", *common, "--stop-after", "3")) is None
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    write_jsonl(train, [{**r, "label": {"pos": "neg", "neg": "pos"}[r["label"]]} for r in rows])
    changed = re.escape(f"{train} changed (same size, sha256") + ".* since the checkpoint"
    with pytest.raises(errors.InputError, match=changed):
        train_nlu.main(argv(encoders["plain"], own, tmp_path / "r", *common, "--resume"))
    # the model's weights are fingerprinted too (size + header): a swapped model.safetensors is refused
    write_jsonl(train, rows)
    model = copy_model_dir(encoders["plain"], tmp_path / "m")
    assert train_nlu.main(argv(model, own, tmp_path / "s", *common, "--stop-after", "3")) is None
    w = load_file(str(model / "model.safetensors"))
    save_file({k: v.double() if v.is_floating_point() else v for k, v in w.items()}, str(model / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{(model / 'model.safetensors').resolve()} changed (size")):
        train_nlu.main(argv(model, own, tmp_path / "s", *common, "--resume"))


@slow
def test_ctrl_c_is_one_line_with_exit_130_and_the_checkpoint_resumes(encoders, files, tmp_path):
    import signal
    import time
    out = tmp_path / "r"
    args = argv(encoders["plain"], files, out, "--method", "pissa", "--epochs", "40", "--save-every", "1")
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    proc = subprocess.Popen([sys.executable, str(HERE / "train_nlu.py"), *args], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "log.jsonl").exists()
                                      or (out / "log.jsonl").read_text().count("\n") < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    m = re.fullmatch(rf"train_nlu\.py: interrupted at step (\d+); `--resume --out {re.escape(str(out))}` \(and the "
                     r"same flags\) continues from its checkpoint at step (\d+)", lines[0])
    assert m and 0 <= int(m[1]) - int(m[2]) <= 1, lines[0]  # --save-every 1: at most the step in progress lost
    assert ckpt_step(out) == int(m[2])
    assert train_nlu.main(args + ["--resume"])["steps"] == 200


def test_the_step_of_a_checkpoint_and_the_ctrl_c_line_that_names_it(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    assert checkpoints.checkpoint_step(out) is None
    assert str(checkpoints.Interrupted(2, out)) == ("interrupted at step 2; no checkpoint was written yet: nothing to "
                                                    "resume")
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    checkpoints.save_checkpoint(out, net, opt, {"step": 4})
    assert checkpoints.checkpoint_step(out) == 4
    assert str(checkpoints.Interrupted(5, out)) == (f"interrupted at step 5; `--resume --out {out}` (and the same "
                                                    f"flags) continues from its checkpoint at step 4")
    for meta in ({"train_state": "[4]"}, {"train_state": '{"step": 4'}, {}):  # not an object, not JSON, no state
        save_file({"x": torch.zeros(1)}, str(out / checkpoints.CHECKPOINT), metadata=meta)
        assert checkpoints.checkpoint_step(out) is None
    (out / checkpoints.CHECKPOINT).write_bytes(b"not safetensors")
    assert checkpoints.checkpoint_step(out) is None


def test_the_json_state_is_read_strictly_and_named(tmp_path):
    where = tmp_path / checkpoints.CHECKPOINT
    assert checkpoints.train_state(where, '{"step": 3, "args": {}}') == {"step": 3, "args": {}}
    for text, why in (('{"step": 3, "step": 1}', "the key 'step' appears twice"), ('{"step": 3', "not valid JSON"),
                      ("[3]", "expected a JSON object, got a list")):
        with pytest.raises(errors.InputError, match=re.escape(f"{where} (train_state): {why}")):
            checkpoints.train_state(where, text)


def with_header(path, edit):
    # the safetensors file at path with its JSON header rewritten by edit(text) (offsets untouched)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = edit(raw[8:8 + n].decode("utf-8"))
    text += " " * ((8 - len(text.encode()) % 8) % 8)  # safetensors pads its header to 8 bytes
    path.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + raw[8 + n:])


def test_a_key_written_twice_in_the_checkpoint_header_is_refused_by_name(encoders, files, tmp_path):
    # two "train_state" in the header's metadata: safetensors keeps one of them, and the run resumed silently at the
    # other's step; the header is read as strictly as the JSON state
    out = tmp_path / "r"
    common = ("--epochs", "2", "--save-every", "2", "--method", "pissa")
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--stop-after", "4")) is None
    ck = out / checkpoints.CHECKPOINT
    state = json.dumps(json.dumps({**json.loads(json.loads(ck.read_bytes()[8:8 + int.from_bytes(
        ck.read_bytes()[:8], "little")])["__metadata__"]["train_state"]), "step": 2}))
    with_header(ck, lambda t: t.replace('"__metadata__":{', '"__metadata__":{"train_state":' + state + ",", 1))
    from safetensors import safe_open
    with safe_open(str(ck), "pt") as f:  # safetensors itself reads it and keeps one of the two
        assert "train_state" in f.metadata()
    where = re.escape(f"{ck} (header): the key 'train_state' appears twice")
    with pytest.raises(errors.InputError, match=where):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    assert checkpoints.checkpoint_step(out) is None
    with pytest.raises(errors.InputError, match=where):
        checkpoints.load_tensors(ck)


def test_a_checkpoint_this_user_cannot_read_says_permission_denied_and_names_it(tmp_path, monkeypatch):
    # before: "No such file or directory"; root reads every file, so the refusal is simulated at open()
    out = tmp_path / "r"
    out.mkdir()
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    checkpoints.save_checkpoint(out, net, opt, {"step": 0})
    ck = out / checkpoints.CHECKPOINT
    real_open = os.open

    def denied(path, *a, **k):
        if str(path) == str(ck):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(errors.InputError, match=re.escape(f"{ck}: permission denied (this user cannot read the "
                                                          f"checkpoint")):
        checkpoints.checkpoint_state(out, "train_nlu.py", argparse_ns(), inputs=None)


def argparse_ns(**kw):
    import argparse
    return argparse.Namespace(**kw)


def test_a_full_disk_during_a_save_keeps_the_old_checkpoint_whole_and_is_one_line(encoders, files, tmp_path,
                                                                                   monkeypatch, capfd):
    # the second checkpoint of a run hits ENOSPC half-way: one line naming the file and the step kept, exit 1, the
    # checkpoint of step 2 byte for byte, no temporary file left; --resume then ends where an uninterrupted run does
    import errno
    out = tmp_path / "r"
    common = ("--epochs", "2", "--save-every", "2", "--method", "pissa")
    calls, real_save = [], checkpoints.save_file
    saved = {}

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            saved["step2"] = (out / checkpoints.CHECKPOINT).read_bytes()
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    monkeypatch.setattr(sys, "argv", ["train_nlu.py", *map(str, argv(encoders["plain"], files, out, *common))])
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        errors.cli(train_nlu.main, "train_nlu.py")
    err = capfd.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"train_nlu.py: error: {out / checkpoints.CHECKPOINT}: the checkpoint of step 4 could not "
                          f"be written (No space left on device); the checkpoint of step 2 is kept whole"), err
    assert (out / checkpoints.CHECKPOINT).read_bytes() == saved["step2"] and not list(out.glob(".tmp-*"))
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))["steps"] == 10


def test_the_run_files_get_the_umask_mode_not_0600(encoders, files, tmp_path):
    # checkpoint.safetensors, metrics.json, log.jsonl and the adapter under umask 022: 0644, as open() makes them
    # (mkstemp alone makes 0600; balora.atomic_write gives the umask's mode, and nothing here sets it back)
    import stat
    old = os.umask(0o022)
    try:
        out = tmp_path / "r"
        train_nlu.main(argv(encoders["plain"], files, out, "--max-steps", "2", "--method", "pissa"))
    finally:
        os.umask(old)
    for name in (checkpoints.CHECKPOINT, "metrics.json", "log.jsonl", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
