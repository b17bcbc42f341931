# tests/test_data.py: data.py: readers and their errors, the fixed splits, imbalance and label-noise counts,
# tokenisation, padding and label masks, batches, instruction data, evaluation text, GSM8K answers.

import functools
import json
import os
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import transformers  # the reference the hand-written models are checked against; test-only

import data
import model as M

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


def test_ground_truth_parse_and_errors(tmp_path):
    p = tmp_path / "gt.txt"
    p.write_bytes("1\t2.5\tGood film\r\n2\t-0.25\tMünch\u2028s film\r\n3\t-1\tBad".encode())
    rows = data.read_ground_truth(p)
    assert rows == [("1", 2.5, "Good film"), ("2", -0.25, "Münch\u2028s film"), ("3", -1.0, "Bad")]
    bad_cases = {
        b"1\t2.5\tok\r\n2\t-0.25 no tab here\r\n": ":2:",
        b"1\t2.5\tok\n2\tx\tnot a score\n": ":2:",
        b"1\t2.5\tok\n2\t1\tok\n3\t9\tout of scale\n": ":3:",
        b"1\t2.5\tok\n1\t1.0\tduplicate id\n": ":2:",
        b"1\t2.5\tok\n2\t1.0\tbad \xff byte\n": ":2:",
    }
    for content, where in bad_cases.items():
        p.write_bytes(content)
        with pytest.raises(ValueError, match=f"gt.txt{where}"):
            data.read_ground_truth(p)


def test_split_is_fixed_disjoint_and_shared_by_both_tasks():
    ids = [str(i) for i in range(1, 991)]
    split = data.split_ids(ids)
    assert data.split_ids(list(reversed(ids))) == split  # independent of file order
    sizes = {s: sum(v == s for v in split.values()) for s in ("train", "validation", "test")}
    assert sizes == {"train": 792, "validation": 99, "test": 99}
    scores = [-3.0, -0.5, -0.49, 0.0, 0.49, 0.5, 3.0]
    rows = [(sid, scores[int(sid) % len(scores)], f"sentence {sid}") for sid in ids]
    three = data.sentiment_splits(rows, "three")
    binary = data.sentiment_splits(rows, "binary")
    seen = set()
    for s in ("train", "validation", "test"):
        texts3 = {t[0] for t in three[s].texts}
        assert not texts3 & seen  # disjoint
        seen |= texts3
        assert all(split[t.split()[1]] == s for t in texts3)
        # binary = three-class minus neutral, in the same split, negative stays negative
        kept = [(t, {0: 0, 2: 1}[y]) for t, y in zip(three[s].texts, three[s].labels) if y != 1]
        assert kept == list(zip(binary[s].texts, binary[s].labels))
    assert len(seen) == 990
    labels = {sc: data.sentiment_label(sc, "three") for sc in scores}
    assert labels == {-3.0: 0, -0.5: 0, -0.49: 1, 0.0: 1, 0.49: 1, 0.5: 2, 3.0: 2}
    assert [data.sentiment_label(sc, "binary") for sc in scores] == [0, 0, None, None, None, 1, 1]


def test_jsonl_csv_tsv_readers(tmp_path):
    j = tmp_path / "train.jsonl"
    j.write_text('{"s1": "a film", "s2": "the plot", "label": 1}\n\n{"s1": "b", "s2": "c", "label": "10"}\n'
                 '{"s1": "d", "s2": "e", "label": 2}\n')
    d = data.read_table(j, ["s1", "s2"], "label")
    assert d.label_names == ["1", "2", "10"] and d.labels == [0, 2, 1]  # integer labels in numeric order
    assert d.texts[0] == ("a film", "the plot")
    c = tmp_path / "dev.csv"
    c.write_text('\ufeffsentence,label\n"a, quoted\nmultiline text",2\nplain,1\n')
    d2 = data.read_table(c, ["sentence"], "label", label_names=d.label_names)
    assert d2.texts == [("a, quoted\nmultiline text",), ("plain",)] and d2.labels == [1, 0]
    t = tmp_path / "sts.tsv"
    t.write_text('a\tb\tscore\nhe said "hi\tx\t4.25\ny\tz\t0\n')  # stray quote: TSVs are unquoted
    r = data.read_table(t, ["a", "b"], "score", regression=True)
    assert r.labels == [4.25, 0.0] and r.label_names is None and r.texts[0] == ('he said "hi', "x")
    batch = data.collate_classification([{"input_ids": [1], "token_type_ids": [0], "label": 4.25}])
    assert batch["labels"].dtype == torch.float32


@pytest.mark.parametrize("name,content,kwargs,where", [
    ("a.jsonl", '{"text": "x", "label": "pos"}\n{"text": "y", "label": "pos"\n', {}, "a.jsonl:2:"),
    ("a.jsonl", '{"text": "x", "label": "pos"}\n\n{"txt": "y", "label": "pos"}\n', {}, "a.jsonl:3:.*'text' missing"),
    ("a.jsonl", '{"text": "x", "label": "pos"}\n["text"]\n', {}, "a.jsonl:2:"),
    ("a.csv", 'text,label\nx,pos\ny,pos,extra\n', {}, "a.csv:3:"),
    ("a.csv", 'text,label\n"multi\nline",pos\ny,pos,extra\n', {}, "a.csv:4:"),
    ("a.tsv", 'sentence\tlabel\nx\tpos\n', {}, "a.tsv:2:.*'text' missing"),
    ("a.tsv", 'text\tlabel\nx\tpos\ny\t\n', {}, "a.tsv:3:.*'label'"),
    ("a.tsv", 'text\tlabel\nx\tpos\ny\tneutral\n', {"label_names": ["neg", "pos"]}, "a.tsv:3: unknown label 'neutral'"),
    ("a.tsv", 'text\tlabel\nx\t1.5\ny\tn/a\n', {"regression": True}, "a.tsv:3:.*not a number"),
])
def test_reader_errors_name_file_and_line(tmp_path, name, content, kwargs, where):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=where):
        data.read_table(p, ["text"], "label", **kwargs)


def test_imbalance_exact_counts():
    r = data.parse_ratios("100:10:1")
    assert r == [Fraction(100), Fraction(10), Fraction(1)]
    assert data.imbalance_counts([1000, 300, 50], r) == [1000, 100, 10]
    assert data.imbalance_counts([400, 30, 50], r) == [300, 30, 3]    # neutral limits the majority target
    assert data.imbalance_counts([4076, 412, 3997], r) == [4076, 407, 40]
    assert data.imbalance_counts([10, 50], data.parse_ratios("1:2.5")) == [10, 25]
    assert data.imbalance_counts([10, 5], data.parse_ratios("3:2")) == [7, 4]  # N = floor(5 * 3/2), 7*2/3 -> 4
    with pytest.raises(ValueError, match="no examples"):
        data.imbalance_counts([50, 5, 5], r)  # 50/100 -> 0 for a class with a positive ratio
    with pytest.raises(ValueError, match="2 imbalance ratios for 3 classes"):
        data.imbalance_counts([1, 2, 3], data.parse_ratios("1:2"))
    labels = [0] * 400 + [1] * 30 + [2] * 50
    labels = [labels[(7 * i) % len(labels)] for i in range(len(labels))]  # interleave the classes
    keep = data.imbalance_indices(labels, 3, r, seed=1)
    assert data.class_counts([labels[i] for i in keep], 3) == [300, 30, 3]
    assert keep == sorted(set(keep)) and keep == data.imbalance_indices(labels, 3, r, seed=1)
    assert keep != data.imbalance_indices(labels, 3, r, seed=2)
    d = data.subsample_imbalanced(data.TextData([(str(i),) for i in range(len(labels))], labels,
                                                ["a", "b", "c"], "t"), "100:10:1", seed=1)
    assert [int(t[0]) for t in d.texts] == keep


def test_label_noise_exact_count_and_other_class():
    labels = [i % 3 for i in range(30)]
    noisy, flipped = data.flip_labels(labels, 3, 0.1, seed=0)
    assert len(flipped) == 3 and len(set(flipped)) == 3
    assert all((noisy[i] != labels[i]) == (i in flipped) for i in range(30))
    assert data.flip_labels(labels, 3, 0.1, seed=0) == (noisy, flipped)
    assert len(data.flip_labels(labels, 3, 0.05, seed=0)[1]) == 2  # 1.5 rounds half up
    assert len(data.flip_labels(labels[:10], 3, 0.25, seed=0)[1]) == 3  # 2.5 too (Python's round gives 2)
    assert len(data.flip_labels(labels, 3, 0.0, seed=0)[1]) == 0
    # every label flipped: the new class is uniform over the two others
    noisy, flipped = data.flip_labels([0] * 6000, 3, 1.0, seed=3)
    assert len(flipped) == 6000 and 0 not in noisy
    assert abs(noisy.count(1) - 3000) < 200
    with pytest.raises(ValueError):
        data.flip_labels(labels, 3, 1.5, seed=0)


def test_pair_token_types_truncation_and_padding():
    tok = tiny_tokenizer()
    tok.enable_padding(length=64)  # fixed padding and truncation, as MiniLM's tokenizer.json has
    tok.enable_truncation(6)
    d = data.TextData([("the film", "was good"), ("the film is good fun " * 3, "bad"), ("a", "b")],
                      [0, 1, 0], ["n", "p"], "pairs")
    ex, n_trunc = data.encode_classification(tok, d, max_len=8)
    assert n_trunc == 1 and tok.truncation["max_length"] == 6 and tok.padding["length"] == 64  # untouched
    assert ex[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]  # [CLS] the film [SEP] | was good [SEP]
    assert len(ex[1]["input_ids"]) == 8
    assert ex[1]["input_ids"][-2:] == [tok.token_to_id("bad"), 3]  # the longer text lost the tokens
    b = data.collate_classification(ex, pad_id=0)
    assert b["input_ids"].shape == (3, 8) and b["labels"].tolist() == [0, 1, 0]
    assert b["attention_mask"][2].tolist() == [1] * 5 + [0] * 3
    assert b["input_ids"][2, 5:].tolist() == [0, 0, 0] and b["token_type_ids"][2].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    # the second text is the longer one here: it is the one cut
    ex, n_trunc = data.encode_classification(tok, data.TextData([("bad", "the film is good fun " * 3)], [0],
                                                                ["n", "p"], "pairs"), max_len=8)
    assert n_trunc == 1 and ex[0]["input_ids"][:3] == [2, tok.token_to_id("bad"), 3]
    assert ex[0]["token_type_ids"] == [0, 0, 0, 1, 1, 1, 1, 1]
    single, n = data.encode_classification(tok, data.TextData([("good",)], [1], ["n", "p"], "s"), max_len=8)
    assert n == 0 and single[0]["input_ids"] == [2, tok.token_to_id("good"), 3]


def test_batches_seeded_cover_everything_once():
    ex = [{"input_ids": [i + 5], "token_type_ids": [0], "label": i} for i in range(10)]
    epoch0 = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=0)]
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    again = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=0)]
    epoch1 = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=1)]
    assert again == epoch0 and epoch1 != epoch0
    plain = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, shuffle=False)]
    assert sum(plain, []) == list(range(10))
    loader = torch.utils.data.DataLoader(ex, batch_size=4, collate_fn=functools.partial(
        data.collate_classification, pad_id=0))  # the example list is a map-style dataset
    assert [b["labels"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_instruction_layouts_and_errors(tmp_path):
    p = tmp_path / "inst.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"query": "what is a", "response": "yes", "type": "x"},
        {"instruction": "why", "input": "the plot", "output": "no"},
        {"instruction": "why", "output": "no"},
        {"prompt": "write", "response": "fun"}]) + "\n")
    assert data.read_instructions(p) == [("what is a", "", "yes"), ("why", "the plot", "no"),
                                         ("why", "", "no"), ("write", "", "fun")]
    p.with_suffix(".json").write_text(json.dumps([{"instruction": "why", "output": "no"},
                                                  {"query": "a\nb", "response": "yes"}], indent=1))
    assert data.read_instructions(p.with_suffix(".json")) == [("why", "", "no"), ("a\nb", "", "yes")]
    p.with_suffix(".json").write_text('[\n{"query": "q", "response": "r"},\n\n{"query": "q"}\n]')
    with pytest.raises(ValueError, match="inst.json:4: no instruction layout"):  # JSON arrays name lines too
        data.read_instructions(p.with_suffix(".json"))
    p.write_text('{"query": "q", "response": "r"}\n{"question": "q", "answer": "r"}\n')
    with pytest.raises(ValueError, match="inst.jsonl:2: no instruction layout"):
        data.read_instructions(p)
    p.write_text('{"query": "q", "response": ""}\n')
    with pytest.raises(ValueError, match="inst.jsonl:1:"):
        data.read_instructions(p)
    assert data.format_prompt("Q?") == ("Below is an instruction that describes a task. Write a response that "
                                       "appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Response:")
    assert "### Input:\nctx\n\n### Response:" in data.format_prompt("Q?", "ctx")
    assert data.format_prompt("Q?", template="chatml") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_and_padding_labels_are_ignored():
    tok = tiny_tokenizer(bert_template=False)
    tok.enable_padding(length=64)  # ignored: padding is per batch
    eos = tok.token_to_id("<eos>")
    records = [("write a review", "", "good fun"), ("why", "", "the plot was boring " * 10), ("what", "", "yes")]
    ex, stats = data.encode_instructions(tok, records, max_len=40, eos_id=eos)
    assert stats == {"examples": 3, "truncated": 1, "dropped": 0}
    for (ins, _, resp), e in zip(records, ex):
        prompt_ids = [i for i in tok.encode(data.format_prompt(ins)).ids if i != 0]
        n_prompt = len(prompt_ids)
        assert e["labels"][:n_prompt] == [-100] * n_prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
        assert e["input_ids"][:n_prompt] == prompt_ids
    assert ex[0]["labels"][-3:] == [tok.token_to_id("good"), tok.token_to_id("fun"), eos]
    assert len(ex[1]["input_ids"]) == 40 and ex[1]["labels"][-1] != eos  # truncated: EOS cut with the tail
    b = data.collate_lm(ex, pad_id=0)
    T = b["input_ids"].shape[1]
    assert T == 40
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["labels"][i, n:].eq(-100).all() and b["labels"][i, :n].tolist() == e["labels"]
    _, stats = data.encode_instructions(tok, records, max_len=20, eos_id=eos)  # prompts are ~22 tokens
    assert stats["dropped"] == 3 and stats["examples"] == 0


def test_text_windows_and_gsm8k_extraction():
    tok = tiny_tokenizer(bert_template=False)
    text = "the film was good " * 10 + "fun"
    w = data.text_windows(tok, text, 8)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert w.shape == (5, 8) and w.flatten().tolist() == ids[:40]
    with pytest.raises(ValueError, match="fewer than one window"):
        data.text_windows(tok, "good", 8)
    assert data.gsm8k_reference("so 3 + 4 = <<3+4=7>>7\n#### 1,234") == 1234.0
    table = {
        "She pays $1,200 in total. The answer is: 1200": 1200.0,
        "So he has 18 - 3 = 15 left.\n#### 15": 15.0,
        "The answer is 7. Check: 7 * 2 = 14": 7.0,
        # the first answer counts: a model that runs on invents the next question and answers that too
        "The answer is 6.\n\nQuestion: Tom has 4 apples and eats 1. How many are left?\nThe answer is 3.": 6.0,
        "Step 1: 2 + 2 = 4. Q: what is 9? 9": 4.0,
        "<|im_start|>assistant\nThe answer is 1.": None,
        "So she needs 3/4 of a cup. The answer is 3/4": 0.75,
        "Half of 1 is .5, so the answer is .5": 0.5,
        "The final answer is 12.5 dollars": 12.5,
        "First 3, then 5, so it is -2.5 degrees": -2.5,
        "It costs $18.": 18.0,
        "Read pages 10-12 today": 12.0,
        "I do not know.": None,
    }
    for output, want in table.items():
        assert data.extract_gsm8k_answer(output) == want, output


@slow
def test_real_assets_default_data():
    three = data.movie_reviews(assets.vader_dir(), "three")
    binary = data.movie_reviews(assets.vader_dir(), "binary")
    assert sum(len(d.labels) for d in three.values()) == data.N_REVIEWS
    assert len(three["validation"].labels) == len(three["test"].labels) == round(0.1 * data.N_REVIEWS)
    for s in three:
        assert [t for t, y in zip(three[s].texts, three[s].labels) if y != 1] == binary[s].texts
    assert len(data.nyt_sentences(assets.vader_dir())) == data.N_NYT
    problems = data.gsm8k_problems(assets.gsm8k_dir())
    assert len(problems) == 100 and all(isinstance(data.gsm8k_reference(a), float) for _, a in problems)
    assert (assets.minilm_dir() / "tokenizer.json").exists() and assets.smollm2_gguf().stat().st_size > 90e6


def test_validation_sample_is_balanced_and_independent_of_file_order():
    # a file sorted by class, as the VADER ratings are: the first 128 lines would all be one class
    recs = [("Write a positive sentence.", "", f"good {i}") for i in range(500)] + \
           [("Write a negative sentence.", "", f"bad {i}") for i in range(300)]
    val, rest = data.balanced_sample(recs, 128)
    assert len(val) == 128 and len(rest) == 672 and set(val).isdisjoint(rest) and set(val) | set(rest) == set(recs)
    assert sum(r[0].startswith("Write a positive") for r in val) == 64
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(data.balanced_sample(shuffled, 128)[0]) == sorted(val)
    unique = [(f"question {i}", "", str(i)) for i in range(100)]  # one record per prompt: a fixed spread sample
    picked = data.balanced_sample(unique, 10)[0]
    assert len(set(picked)) == 10 and picked != unique[:10] and picked != unique[-10:]
    assert data.balanced_sample(recs, 0) == ([], recs)


def test_non_utf8_csv_and_jsonl_name_the_line(tmp_path):
    for name, raw in (("a.jsonl", b'{"sentence": "x", "label": 1}\n{"sentence": "\xff", "label": 0}\n'),
                      ("a.csv", b"sentence,label\nok,1\nbad \xff,0\n"), ("a.tsv", b"sentence\tlabel\nok\t1\n\xfe\t0\n")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(data.DataError, match=rf"{re.escape(name)}:[23]: not UTF-8"):
            data.read_table(tmp_path / name, ["sentence"], "label")


def test_numeric_labels_in_any_format_are_one_class(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": "1"},
                                           {"sentence": "c", "label": 1.0}, {"sentence": "d", "label": "0"},
                                           {"sentence": "e", "label": 0.0}])
    d = data.read_table(f, ["sentence"], "label")
    assert d.label_names == ["0", "1"] and d.labels == [1, 1, 1, 0, 0]


def test_csv_duplicate_header_is_refused_and_a_multiline_field_is_reported(tmp_path, capsys):
    (tmp_path / "dup.csv").write_text("sentence,label,label\nx,1,0\n")
    with pytest.raises(data.DataError, match=r"dup\.csv:1: duplicate column.*'label'"):
        data.read_table(tmp_path / "dup.csv", ["sentence"], "label")
    (tmp_path / "q.csv").write_text('sentence,label\n"an unterminated quote,1\nnext row,0\n')
    with pytest.raises(data.DataError):  # the runaway quote swallows the rest: no row has 2 fields
        data.read_table(tmp_path / "q.csv", ["sentence"], "label")
    (tmp_path / "m.csv").write_text('sentence,label\n"two\nlines",1\nok,0\n')
    d = data.read_table(tmp_path / "m.csv", ["sentence"], "label")
    assert len(d.labels) == 2 and "m.csv" in capsys.readouterr().err


def test_readers_open_only_regular_files_and_never_wait_on_a_fifo(tmp_path):
    # a FIFO (no writer: opening would wait forever; a writer: its data would be taken), /dev/zero (never ends), a
    # directory, a missing file: a DataError naming the path, at once
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.write(writer, b"data")
    for path, what in ((fifo, "a FIFO (named pipe), not a regular file"),
                       ("/dev/zero", "a character device, not a regular file"),
                       (tmp_path, "a directory, not a regular file"), (tmp_path / "none.jsonl", "no such file")):
        with pytest.raises(data.DataError, match=re.escape(f"{path}: {what}")):
            data.read_text(path)
        if str(path).endswith(".jsonl"):
            with pytest.raises(data.DataError, match=re.escape(f"{path}: {what}")):
                data.read_table(Path(path), ["sentence"], "label")
    assert os.read(writer, 100) == b"data"
    os.close(writer)
    with pytest.raises(data.DataError, match=re.escape(f"--train-file {fifo}: a FIFO")):
        data.open_input(fifo, "--train-file")
