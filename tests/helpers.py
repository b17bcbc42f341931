# tests/helpers.py: what several test files share: tiny models and data files written on the fly, and helpers
# that run the scripts in-process, as subprocesses and under torchrun. tests/conftest.py registers the fixtures.

import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import balora
import data
import model as M
import train_nlg
import train_nlu
from plumbing import assets, checkpoints

torch.set_num_threads(2)


# Slow end-to-end tests: BALORA_QUICK=1 skips them (the README's quick command); CI runs everything.
slow = pytest.mark.skipif(os.environ.get("BALORA_QUICK", "") not in ("", "0"), reason="BALORA_QUICK=1: a quick run")


WORDS = ("the a film movie is was good bad great awful plot actors boring fun what why answer question "
         "write sentence review positive negative below instruction describes task response above yes no").split()


def tiny_tokenizer(bert_template: bool = True) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


HERE = Path(__file__).resolve().parent.parent  # the project root


POS, NEG, OTHER = ["good", "great", "superb", "fun"], ["bad", "awful", "boring", "dull"], \
    ["the", "a", "film", "movie", "is", "was", "plot", "actors", "very"]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *POS, *NEG, *OTHER]


NLU_TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"


def make_encoder(path, dropout):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    BertModel(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"dropout": make_encoder(root / "dropout", 0.1), "plain": make_encoder(root / "plain", 0.0)}


def sentences(n, label_words, rng):
    return [" ".join(rng.choice(OTHER) for _ in range(rng.randint(1, 6))) + " " + rng.choice(label_words)
            for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("data"), random.Random(0)
    out = {}
    for split, n in (("train", 20), ("validation", 8), ("test", 8)):
        rows = [{"sentence": s, "label": "pos"} for s in sentences(n, POS, rng)] + \
               [{"sentence": s, "label": "neg"} for s in sentences(n, NEG, rng)]
        rng.shuffle(rows)
        out[split] = write_jsonl(root / f"{split}.jsonl", rows)
    return out


def argv(enc, files, out, *extra):
    return ["--model", str(enc), "--train-file", str(files["train"]), "--val-file", str(files["validation"]),
            "--test-file", str(files["test"]), "--out", str(out), "--threads", "1", "--batch-size", "8",
            "--max-steps", "0", "--rank", "2", "--targets", NLU_TARGETS, "--dtype", "fp32", "--save-every", "0",
            *extra]


def batch_of(files, enc, n=None):
    import data
    tok = M.load_tokenizer(enc)
    d = data.read_table(files["train"], ["sentence"], "label")
    ex, _ = data.encode_classification(tok, d, 32)
    return ex[:n] if n else ex


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(out / "adapter" / balora.ADAPTER_FILE)


def ckpt_step(out):
    # the step of the run's checkpoint (its JSON state lives in the safetensors metadata)
    from safetensors import safe_open
    with safe_open(str(Path(out) / checkpoints.CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["train_state"])["step"]


NLG_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2


NLG_WORDS = ("the movie was a great fun bad dull story with actors and plot that I loved hated film music scenes "
         "director brilliant boring long short warm cold funny sad ending every minute of it").split()


def tiny_records(n, seed=0):
    g = np.random.default_rng(seed)
    prompts = ["Write a positive movie review sentence.", "Write a negative movie review sentence."]
    return [{"instruction": prompts[i % 2],
             "output": " ".join(g.choice(NLG_WORDS, size=int(g.integers(3, 12)))).capitalize() + "."}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # a 2-layer GQA LLaMA with tied embeddings (like SmolLM2) and a small byte-level BPE tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny_nlg")
    mdir = root / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["instruction"] + " " + r["output"] for r in tiny_records(200)] + ["user assistant\n"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=NLG_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert [tok.token_to_id(s) for s in NLG_SPECIALS] == [0, 1, 2]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.1, rope_theta=10000.0)
    LlamaForCausalLM(cfg).save_pretrained(mdir)
    tok.save(str(mdir / "tokenizer.json"))
    for name, recs in [("train.jsonl", tiny_records(24, 1)), ("val.jsonl", tiny_records(6, 2))]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "drift.txt").write_text(" ".join(" ".join(r.values()) for r in tiny_records(40, 3)))
    return root


def cli(tiny_llama, out, *extra):
    return ["--model", str(tiny_llama / "model"), "--train-file", str(tiny_llama / "train.jsonl"),
            "--val-file", str(tiny_llama / "val.jsonl"), "--eval-text", str(tiny_llama / "drift.txt"), "--template", "chatml",
            "--max-len", "40", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "4",
            "--grad-accum", "2", "--max-steps", "4", "--dtype", "fp32", "--val-examples", "4",
            "--drift-len", "16", "--drift-windows", "4", "--gen-prompts", "4", "--gen-tokens", "6",
            "--eval-batch-size", "3", "--out", str(out), *extra]


def lm_batch_of(tiny_llama, n=3, max_len=40):
    tok = M.load_tokenizer(tiny_llama / "model")
    recs = [(r["instruction"], "", r["output"]) for r in tiny_records(n, 5)]
    ex, _ = data.encode_instructions(tok, recs, max_len, 2, "chatml")
    return ex, data.collate_lm(ex, pad_id=2)


def vocab(tiny_llama):
    return M.load_tokenizer(tiny_llama / "model").get_vocab_size()


def adapted(tiny_llama, init="pissa"):
    net = M.from_pretrained(tiny_llama / "model")
    torch.manual_seed(0)
    balora.inject(net, train_nlg.TARGETS.split(","), 4, 8, init)
    return net


class FixedLogits(nn.Module):
    # stands in for a causal LM: trainable student logits, other (fixed) logits when in eval mode (teacher)
    def __init__(self, B, T, V):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.z = nn.Parameter(torch.randn(B, T, V, generator=g))
        self.register_buffer("zt", torch.randn(B, T, V, generator=g))

    def forward(self, ids, rows=None, logits=True):
        z = self.z if self.training else self.zt  # logits=False: these rows stand in for the hidden states
        return z if rows is None else z[rows]

    def output_weight(self):
        return torch.eye(self.z.shape[-1])  # hidden @ Iᵀ = the logits


ALL_ON = dict(focus_schedule="constant", lambda1_schedule="constant", svd_k=2, top_k=5)


EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def resolved_dtype_in_subprocess(env_extra):
    code = "from plumbing import devices; print(devices.resolve_dtype('auto', 'cpu')[0])"
    env = {k: v for k, v in os.environ.items() if k not in EMULATE_AVX2} | env_extra
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


class RecordingStub(nn.Module):
    # logits from a fixed linear map of the token embeddings; records the dtype the task loss saw
    def __init__(self, V=40):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(V, 16, generator=g))
        self.out = nn.Linear(16, V)

    def forward(self, ids, rows=None):
        z = self.out(self.emb[ids])
        return z if rows is None else z[rows]


def drop_flag(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def torchrun(script, args, nproc=2):
    # the script under torchrun on CPU (gloo): nproc processes of one thread each, a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def step_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in r and "event" not in r]


def run_script(script, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"} | (env_extra or {})
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_model_dir(src, dst, **cfg):
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(cfg)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


UNTIMED = lambda rec: {k: v for k, v in rec.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s", "eta_s")}


class FakeCuda:
    # torch.cuda as a machine with one GPU of the given compute capability would show it
    def __init__(self, name, capability):
        self.name, self.capability = name, capability

    def is_available(self):
        return True

    def device_count(self):
        return 1

    def get_device_capability(self, device=None):
        return self.capability

    def get_device_name(self, device=None):
        return self.name

    def is_bf16_supported(self, including_emulation=True):
        return including_emulation or self.capability >= (8, 0)  # torch's answer counts emulation by default


# ---- one step of each script's loss, with the teacher as train() builds it ------------------------------------

NO_REG = dict(lambda1=0.0, lambda2=0.0, lambda3=0.0)


def nlu_build(args, num_labels=2, init=None):
    # train_nlu.build_model on the CPU, with another init than the method's when asked
    args.device, args.init = "cpu", init or args.init
    return train_nlu.build_model(args, num_labels)


def nlu_step(net, micro_batches, cfg=None, step=0, total=10, amp=nullcontext()):
    # train_nlu.accumulate with the uncached teacher; cfg None: no regularisers (LoRA, PiSSA)
    cfg = cfg or balora.BALoRAConfig.nlu(**NO_REG)
    return train_nlu.accumulate(net, lambda b: train_nlu.teacher_logits(net, b), micro_batches, cfg, step, total, amp)


def nlg_teacher(net, amp=nullcontext()):
    return lambda b, rows: train_nlg.teacher_logits(net, b, rows, amp)


def nlg_loss(net, batch, cfg=None, step=0, total=10, amp=nullcontext()):
    cfg = cfg or balora.BALoRAConfig.nlg(**NO_REG)
    return train_nlg.micro_batch_loss(net, nlg_teacher(net, amp), batch, cfg, step, total, amp)


def nlg_step(net, micro_batches, cfg=None, step=0, total=10, amp=nullcontext()):
    cfg = cfg or balora.BALoRAConfig.nlg(**NO_REG)
    return train_nlg.accumulate(net, nlg_teacher(net, amp), micro_batches, cfg, step, total, amp)
