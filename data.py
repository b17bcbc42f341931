# data.py: the data: the default tasks (human-rated movie-review sentences, NYT editorial text, GSM8K), the
# readers of any GLUE-style JSONL/CSV/TSV, instruction JSONL (MetaMathQA, Alpaca) or plain text, the splits,
# class imbalance and label noise, tokenisation, padding and batches. Paper §4: NLU (GLUE; Table 12 imbalance),
# NLG (MetaMathQA -> GSM8K; Table 13 knowledge drift). Used by train_nlu.py and train_nlg.py; it reads files,
# plumbing/assets.py fetches the default ones.
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import stat
import sys
import tomllib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from tokenizers import Tokenizer


class DataError(ValueError):
    """A data file that cannot be read as asked: the message names the file and, where it can, the line."""


def decode_utf8(raw: bytes, path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def file_kind(mode) -> str:
    # what a path that is not a regular file is, in words (for the one-line errors)
    return next((name for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                         (stat.S_ISSOCK, "a socket")) if test(mode)), "not a regular file")


def open_input(path, what=None):
    # A binary file object of `path`, which must be a regular file: opened without blocking (a FIFO with no writer
    # would wait forever, one with a writer would have its data taken) and checked before a byte is read (/dev/zero
    # never ends). `what` names it in the error (a flag), else the path does.
    where = f"{what} {path}" if what else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except PermissionError:
        raise DataError(f"{where}: permission denied (cannot read it)") from None
    except OSError as e:
        raise DataError(f"{where}: cannot be read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{where}: {file_kind(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_file(path) -> bytes:
    # the bytes of a regular file (open_input), every failure one line naming it
    with open_input(path) as f:
        try:
            return f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror})") from None


IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding); the value torch's CE skips


def gsm8k_problems(directory) -> list[tuple[str, str]]:
    # The 100 original GSM8K test problems in a directory of TOML files (plumbing/assets.gsm8k_dir), as
    # (question, full solution ending in "#### n"), in file order.
    problems = []
    for i in range(100):
        path = Path(directory) / f"{i:04d}.toml"
        try:
            record = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise DataError(f"{path}: cannot read GSM8K problem: {e}") from e
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"{path}: key {key!r} missing or not a non-empty string")
        if "####" not in record["answer"]:
            raise DataError(f"{path}: key 'answer' has no '#### n' final answer")
        problems.append((record["question"].strip(), record["answer"].strip()))
    return problems


# -----------------------------------------------------------------------------
# Labelled text, and the default task: human-rated movie-review sentences (Hutto & Gilbert, ICWSM 2014).


@dataclass
class TextData:
    texts: list                    # tuple of 1 text (single sentence) or 2 (pair) per example
    labels: list                   # class ids (int), or floats for regression
    label_names: list | None       # class names, index = class id; None for regression
    source: str                    # where it came from, for messages


def read_ground_truth(path: Path) -> list[tuple[str, float, str]]:
    # VADER's *_GroundTruth.txt: "id<TAB>mean rating in [-4, 4]<TAB>sentence", UTF-8, CRLF line ends.
    path = Path(path)
    text = decode_utf8(read_file(path), path)
    lines = text.split("\n")  # not splitlines(): it would also split at U+2028 and friends inside a sentence
    if lines and lines[-1] == "":
        lines.pop()
    rows, seen = [], set()
    for n, line in enumerate(lines, 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3:
            raise DataError(f"{path}:{n}: expected 3 tab-separated fields (id, score, text), got {len(fields)}")
        sid, score, sentence = fields[0].strip(), fields[1], fields[2].strip()
        try:
            score = float(score)
        except ValueError:
            raise DataError(f"{path}:{n}: score {fields[1]!r} is not a number") from None
        if not -4.0 <= score <= 4.0:
            raise DataError(f"{path}:{n}: score {score} outside the rating scale [-4, 4]")
        if not sid or sid in seen or not sentence:
            raise DataError(f"{path}:{n}: empty or duplicate id {sid!r}, or empty sentence")
        seen.add(sid)
        rows.append((sid, score, sentence))
    return rows


SPLIT_SALT = "balora-vader-movie"


def split_ids(ids: list[str]) -> dict[str, str]:
    # Fixed split, independent of seeds, file order and library versions: order the ids by
    # sha256(SPLIT_SALT + ":" + id); the first 10 % are test, the next 10 % validation, the rest train.
    # It is computed once over all review sentences, so every task derived from them shares it.
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{SPLIT_SALT}:{i}".encode()).digest())
    n_test = n_val = round(0.1 * len(order))
    return {i: "test" if k < n_test else "validation" if k < n_test + n_val else "train"
            for k, i in enumerate(order)}


# A mean rating within 0.5 of 0 rounds to the scale's "neutral" point. The ratings are strongly bimodal
# (10 605 sentences: 5 076 <= -0.5, 533 in between, 4 996 >= 0.5), so the neutral class is a natural
# ~5 % minority; the binary task is exactly the three-class task without it.
NEUTRAL_BAND = 0.5
LABELS3 = ["negative", "neutral", "positive"]
LABELS2 = ["negative", "positive"]
N_REVIEWS, N_NYT = 10_605, 5_190


def sentiment_label(score: float, task: str) -> int | None:
    if task == "three":
        return 0 if score <= -NEUTRAL_BAND else 2 if score >= NEUTRAL_BAND else 1
    if task == "binary":
        return None if abs(score) < NEUTRAL_BAND else int(score > 0)
    raise DataError(f"task must be 'binary' or 'three', got {task!r}")


def sentiment_splits(rows: list[tuple[str, float, str]], task: str, source: str = "") -> dict[str, TextData]:
    names = LABELS3 if task == "three" else LABELS2
    split = split_ids([sid for sid, _, _ in rows])
    out = {s: TextData([], [], names, f"{source} [{s}]") for s in ("train", "validation", "test")}
    for sid, score, sentence in rows:
        label = sentiment_label(score, task)
        if label is not None:
            out[split[sid]].texts.append((sentence,))
            out[split[sid]].labels.append(label)
    return out


def movie_reviews(vader_dir, task: str = "binary") -> dict[str, TextData]:
    # vader_dir: the VADER human ratings (plumbing/assets.vader_dir fetches them)
    path = Path(vader_dir) / "movieReviewSnippets_GroundTruth.txt"
    rows = read_ground_truth(path)
    if len(rows) != N_REVIEWS:
        raise DataError(f"{path}: {len(rows)} sentences, the pinned file has {N_REVIEWS}")
    splits = sentiment_splits(rows, task, path.name)
    for name, d in splits.items():
        print(f"data: movie reviews ({task}) {name}: {len(d.labels)} [{describe_counts(d)}]")
    return splits


def nyt_sentences(vader_dir) -> list[str]:
    # General English the fine-tuning never sees: the knowledge-drift text (the paper's Wikitext-2 check).
    path = Path(vader_dir) / "nytEditorialSnippets_GroundTruth.txt"
    rows = read_ground_truth(path)
    if len(rows) != N_NYT:
        raise DataError(f"{path}: {len(rows)} sentences, the pinned file has {N_NYT}")
    return [sentence for _, _, sentence in rows]


REVIEW_PROMPTS = ["Write a negative movie review sentence.", "Write a positive movie review sentence."]


def review_writing(vader_dir) -> dict[str, list[tuple[str, str, str]]]:
    # The default NLG task: (instruction, input, response) from the binary task, with its split.
    return {name: [(REVIEW_PROMPTS[y], "", t[0]) for t, y in zip(d.texts, d.labels)]
            for name, d in movie_reviews(vader_dir, "binary").items()}


# -----------------------------------------------------------------------------
# General readers: GLUE-style JSONL / CSV / TSV with named columns.


def _json_array_rows(path: Path, text: str):
    # A .json file holding one array of objects (Alpaca's alpaca_data.json, MetaMathQA's release), decoded
    # element by element so that an error can still name the line where the element starts.
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos, line, seen = ws.match(text).end() + 1, 1, 0  # just past "["

    def line_at(p):
        nonlocal line, seen
        line, seen = line + text.count("\n", seen, p), p
        return line
    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_at(pos)}: expected a JSON object, got {type(row).__name__}")
        yield line_at(pos), row
        pos = ws.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise DataError(f"{path}:{line_at(pos)}: malformed JSON array (expected ',' or ']')")
        pos = ws.match(text, pos + 1).end()


def read_rows(path: Path):
    # Yields (line number, {column: value}); the line number is the physical line where the row starts.
    if path.suffix == ".json":
        text = decode_utf8(read_file(path), path).removeprefix("\ufeff")
        if text.lstrip().startswith("["):
            yield from _json_array_rows(path, text)
            return
    if path.suffix in (".jsonl", ".json"):
        # decoded as a whole through _decode: a non-UTF-8 byte is an error naming the line, as for .json arrays
        for n, line in enumerate(decode_utf8(read_file(path), path).removeprefix("\ufeff").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row
        return
    if path.suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: unknown format, expected .jsonl, .json (an array, or one object per line), "
                         ".csv or .tsv")
    text = decode_utf8(read_file(path), path).removeprefix("\ufeff")
    # GLUE's TSVs are unquoted (sentences contain stray quotes), CSVs use ordinary quoting
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE) \
        if path.suffix == ".tsv" else csv.reader(io.StringIO(text, newline=""))
    header, start, multiline = None, 1, []
    try:
        for fields in reader:
            if not fields:
                start = reader.line_num + 1
                continue
            if header is None:
                header = fields
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup:
                    raise DataError(f"{path}:{start}: duplicate column(s) {dup} in the header")
            elif len(fields) != len(header):
                raise DataError(f"{path}:{start}: {len(fields)} fields, the header has {len(header)}")
            else:
                if reader.line_num > start:  # a quoted field spanning lines, or an unterminated quote
                    multiline.append(start)
                yield start, dict(zip(header, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed row ({e})") from None
    if multiline:
        print(f"data: warning: {path}: {len(multiline)} row(s) span several lines (a quoted newline, or a quote "
              f"that is never closed), first at line {multiline[0]}: check the quoting", file=sys.stderr)


def _sort_labels(names: set[str]) -> list[str]:
    # integer labels ("0", "1", "10") in numeric order so that label "k" gets id k; others alphabetically
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _label_text(value: str) -> str:
    # 1, "1", 1.0 and "1.0" are one class, "1": a numeric label is written in one canonical form
    value = value.strip()
    try:
        x = float(value)
    except ValueError:
        return value
    return str(int(x)) if x.is_integer() else repr(x) if math.isfinite(x) else value


def read_table(path, text_fields: list[str], label_field: str, label_names: list[str] | None = None,
               regression: bool = False) -> TextData:
    # Classification: labels are strings (JSON numbers are read as their text) mapped to ids through
    # label_names; read train with label_names=None to infer them, then pass train's list to the other
    # splits so that ids are fixed and an unseen label is an error. Regression (STS-B): float labels.
    path = Path(path)
    if len(text_fields) not in (1, 2):
        raise DataError(f"text_fields must name one column or two (a pair), got {text_fields}")
    texts, raw = [], []
    for n, row in read_rows(path):
        values = []
        for key in [*text_fields, label_field]:
            value = row.get(key)
            if value is None or isinstance(value, (dict, list, bool)) or str(value).strip() == "":
                what = "missing" if key not in row else f"empty or not a string/number ({value!r})"
                raise DataError(f"{path}:{n}: column {key!r} {what}; columns here: {sorted(row)}")
            values.append(str(value))
        texts.append(tuple(values[:-1]))
        raw.append((n, _label_text(values[-1])))
    if not texts:
        raise DataError(f"{path}: no examples")
    if regression:
        labels = []
        for n, value in raw:
            try:
                labels.append(float(value))
            except ValueError:
                raise DataError(f"{path}:{n}: regression label {value!r} is not a number") from None
            if not math.isfinite(labels[-1]):
                raise DataError(f"{path}:{n}: regression label {value!r} is not finite")
        return TextData(texts, labels, None, str(path))
    names = list(label_names) if label_names is not None else _sort_labels({v for _, v in raw})
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for n, value in raw:
        if value not in index:
            raise DataError(f"{path}:{n}: unknown label {value!r}; known labels: {names}")
        labels.append(index[value])
    return TextData(texts, labels, names, str(path))


# -----------------------------------------------------------------------------
# Training-set interventions (Table 12: MNLI at 100:10:1; label noise). Pure functions of (labels, seed).


def class_counts(labels: list[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for y in labels:
        counts[y] += 1
    return counts


def describe_counts(data: TextData) -> str:
    if data.label_names is None:
        return "regression"
    counts = class_counts(data.labels, len(data.label_names))
    return ", ".join(f"{name} {c}" for name, c in zip(data.label_names, counts))


def parse_ratios(spec: str) -> list[Fraction]:
    try:
        ratios = [Fraction(part.strip()) for part in spec.split(":")]
    except (ValueError, ZeroDivisionError):
        raise DataError(f"imbalance {spec!r}: expected ratios like 100:10:1") from None
    if any(r < 0 for r in ratios) or max(ratios) <= 0:
        raise DataError(f"imbalance {spec!r}: ratios must be >= 0 with a positive largest one")
    return ratios


def imbalance_counts(counts: list[int], ratios: list[Fraction]) -> list[int]:
    # Class k gets floor(N * r_k / r_max) examples, where N (the majority target) is the largest value for
    # which every class still has that many: N = min_k floor(c_k * r_max / r_k). Exact rational arithmetic.
    if len(counts) != len(ratios):
        raise DataError(f"{len(ratios)} imbalance ratios for {len(counts)} classes")
    r_max = max(ratios)
    n_major = min(math.floor(c * r_max / r) for c, r in zip(counts, ratios) if r > 0)
    if n_major == 0:
        raise DataError(f"imbalance {ratios}: a class with a positive ratio has no examples (counts {counts})")
    targets = [math.floor(n_major * r / r_max) for r in ratios]
    if any(t == 0 and r > 0 for t, r in zip(targets, ratios)):
        raise DataError(f"imbalance {':'.join(map(str, ratios))} on class counts {counts} leaves a class with a "
                         f"positive ratio no examples ({targets}); the majority class has too few examples")
    return targets


def imbalance_indices(labels: list[int], num_classes: int, ratios: list[Fraction], seed: int) -> list[int]:
    # A seeded random subset of each class, of the sizes imbalance_counts gives; indices in original order.
    targets = imbalance_counts(class_counts(labels, num_classes), ratios)
    rng = random.Random(seed)
    keep = []
    for k in range(num_classes):
        members = [i for i, y in enumerate(labels) if y == k]
        keep += rng.sample(members, targets[k])
    return sorted(keep)


def flip_labels(labels: list[int], num_classes: int, p: float, seed: int) -> tuple[list[int], list[int]]:
    # Exactly floor(p*N + 0.5) labels (round half up), chosen without replacement, each moved to a class drawn
    # uniformly from the other num_classes - 1. Returns the new labels and the sorted flipped indices.
    if not 0.0 <= p <= 1.0 or num_classes < 2:
        raise DataError(f"label noise needs 0 <= p <= 1 and >= 2 classes, got p={p}, {num_classes} classes")
    rng = random.Random(seed)
    flipped = sorted(rng.sample(range(len(labels)), math.floor(p * len(labels) + 0.5)))
    noisy = list(labels)
    for i in flipped:
        noisy[i] = (labels[i] + 1 + rng.randrange(num_classes - 1)) % num_classes
    return noisy, flipped


def subsample_imbalanced(data: TextData, spec: str, seed: int) -> TextData:
    # ratios are given in label_names order, e.g. 100:10:1 over (negative, neutral, positive)
    before = describe_counts(data)
    keep = imbalance_indices(data.labels, len(data.label_names), parse_ratios(spec), seed)
    out = TextData([data.texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names, data.source)
    print(f"data: imbalance {spec} on {data.source}: [{before}] -> [{describe_counts(out)}]")
    return out


def add_label_noise(data: TextData, p: float, seed: int) -> TextData:
    labels, flipped = flip_labels(data.labels, len(data.label_names), p, seed)
    out = TextData(data.texts, labels, data.label_names, data.source)
    print(f"data: label noise p={p} on {data.source}: flipped {len(flipped)} of {len(labels)}; "
          f"noisy counts [{describe_counts(out)}]")
    return out


# -----------------------------------------------------------------------------
# Tokenisation, dynamic padding, batches (classification / regression).


def _plain(tok: Tokenizer) -> Tokenizer:
    # A private copy without padding or truncation: tokenizer.json files often fix both (MiniLM's pads and
    # cuts everything at 128), while we pad per batch and truncate here, counted; the caller's is untouched.
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def encode_classification(tok: Tokenizer, data: TextData, max_len: int) -> tuple[list[dict], int]:
    # [CLS] a [SEP] (b [SEP]) with token types from the tokenizer's post-processor. Returns the examples
    # and how many were truncated to max_len (pairs lose tokens from the longer text first).
    tok = _plain(tok)
    inputs = [t if len(t) == 2 else t[0] for t in data.texts]
    encodings = tok.encode_batch(inputs)
    long = [i for i, e in enumerate(encodings) if len(e.ids) > max_len]
    if long:
        tok.enable_truncation(max_len, strategy="longest_first")
        for i, e in zip(long, tok.encode_batch([inputs[i] for i in long])):
            encodings[i] = e
    print(f"data: {data.source}: {len(long)} of {len(encodings)} examples truncated to {max_len} tokens")
    examples = [{"input_ids": e.ids, "token_type_ids": e.type_ids, "label": y}
                for e, y in zip(encodings, data.labels)]
    return examples, len(long)


def collate_classification(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        token_type_ids[b, :n] = torch.tensor(e["token_type_ids"])
        attention_mask[b, :n] = 1
    regression = isinstance(examples[0]["label"], float)
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.float32 if regression else torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels}


def batches(examples: list[dict], batch_size: int, collate, shuffle: bool = True, seed: int = 0, epoch: int = 0):
    # One pass over the examples. The order depends only on (seed, epoch), so a resumed run can rebuild any
    # epoch's order and skip the batches it has done. (A list of example dicts also works as a map-style
    # dataset for torch.utils.data.DataLoader with collate_fn=collate.)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=g).tolist()
    else:
        order = list(range(len(examples)))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]])


def micro_batches(examples: list, n: int, collate) -> list:
    # One optimizer step's examples -> n collated micro-batches of equal size (--batch-size is examples per
    # optimizer step in both scripts, --grad-accum splits it); an epoch's last, smaller step gets n smaller ones.
    size = math.ceil(len(examples) / n)
    return [collate(examples[i:i + size]) for i in range(0, len(examples), size)]


def shard(examples: list, rank: int, world: int) -> list:
    # Under torchrun, this rank's contiguous share of one step's examples: rank r takes the r-th of `world`
    # equal parts, so the ranks' micro-batches in rank order are one process's micro-batches of the same step.
    return examples if world == 1 else micro_batches(examples, world, list)[rank]


def balanced_sample(records: list, n: int, key=lambda r: r[:2]) -> tuple[list, list]:
    # -> (n records, the rest). An evaluation subset must not depend on file order (the VADER file is sorted by
    # polarity: its first 128 sentences are all positive): records are grouped by key (the prompt), each group
    # is ordered by a hash of its records, and the groups are taken from in turn. With one record per prompt
    # this is a fixed pseudo-random sample; the same for every seed and method, so all runs see the same set.
    digest = lambda x: hashlib.sha256(json.dumps(x, ensure_ascii=False).encode()).digest()
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(json.dumps(key(r), ensure_ascii=False), []).append(i)
    queues = [sorted(g, key=lambda i: digest(records[i])) for _, g in sorted(groups.items(), key=lambda kv: digest(kv[0]))]
    chosen = []
    for rank in range(max(map(len, queues), default=0)):
        chosen += [q[rank] for q in queues if rank < len(q)]
    chosen = chosen[:n]
    taken = set(chosen)
    return [records[i] for i in chosen], [r for i, r in enumerate(records) if i not in taken]


# -----------------------------------------------------------------------------
# Instruction data for NLG: prompt tokens get label -100, only the response and EOS are learned.

# The Alpaca prompt as used by MetaMath's train_math.py and PiSSA's training script for MetaMathQA (the
# response follows "### Response:" directly). Alpaca records with a non-empty `input` use Alpaca's
# second template.
ALPACA_PROMPT = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Response:")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
CHATML_PROMPT = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

INSTRUCTION_LAYOUTS = [("query", None, "response"),           # MetaMathQA
                       ("instruction", "input", "output"),    # Alpaca (input optional)
                       ("prompt", None, "response")]


def read_instructions(path) -> list[tuple[str, str, str]]:
    # JSONL in any of INSTRUCTION_LAYOUTS (decided per line) -> (instruction, input, response)
    path = Path(path)
    records = []
    for n, row in read_rows(path):
        for q_key, in_key, r_key in INSTRUCTION_LAYOUTS:
            if q_key in row and r_key in row:
                break
        else:
            raise DataError(f"{path}:{n}: no instruction layout matches keys {sorted(row)}; expected "
                             + " or ".join("/".join(k for k in lay if k) for lay in INSTRUCTION_LAYOUTS))
        fields = [row[q_key], row.get(in_key, "") if in_key else "", row[r_key]]
        if not all(isinstance(v, str) for v in fields) or not fields[0].strip() or not fields[2].strip():
            raise DataError(f"{path}:{n}: {q_key!r} and {r_key!r} must be non-empty strings"
                             + (f", {in_key!r} a string" if in_key else ""))
        records.append(tuple(fields))
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    if template == "alpaca":
        return (ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT).format(instruction=instruction, input=input)
    if template == "chatml":
        return CHATML_PROMPT.format(instruction=f"{instruction}\n\n{input}" if input else instruction)
    raise DataError(f"template must be 'alpaca' or 'chatml', got {template!r}")


def encode_instructions(tok: Tokenizer, records: list[tuple[str, str, str]], max_len: int, eos_id: int,
                        template: str = "alpaca") -> tuple[list[dict], dict]:
    # input_ids = prompt (with the tokenizer's own special tokens, e.g. BOS) + response + EOS; labels are
    # aligned with input_ids (the model shifts) and -100 on the prompt. Prompt and response are tokenized
    # separately so the boundary is exact. Too long: the response is cut to fit (counted as truncated); a
    # prompt that alone fills max_len leaves nothing to learn and the example is dropped (counted).
    # For ChatML pass eos_id = the id of <|im_end|>, the token that ends an assistant turn.
    tok = _plain(tok)
    prompts = tok.encode_batch([format_prompt(i, x, template) for i, x, _ in records])
    responses = tok.encode_batch([r for _, _, r in records], add_special_tokens=False)
    examples, truncated, dropped = [], 0, 0
    for p, r in zip(prompts, responses):
        target = r.ids + [eos_id]
        if len(p.ids) >= max_len:
            dropped += 1
            continue
        if len(p.ids) + len(target) > max_len:
            truncated += 1
            target = target[:max_len - len(p.ids)]
        examples.append({"input_ids": p.ids + target, "labels": [IGNORE_INDEX] * len(p.ids) + target})
    stats = {"examples": len(examples), "truncated": truncated, "dropped": dropped}
    print(f"data: {len(records)} instruction examples: {truncated} responses truncated to fit {max_len} "
          f"tokens, {dropped} dropped (prompt alone >= {max_len} tokens), {len(examples)} kept")
    return examples, stats


def collate_lm(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    # right padding (training); padded positions: attention 0, label -100
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -----------------------------------------------------------------------------
# Plain text for perplexity (--eval-text, the drift text) and GSM8K answers.


def read_text(path) -> str:
    path = Path(path)
    return decode_utf8(read_file(path), path)


def text_windows(tok: Tokenizer, text: str, window: int, source: str = "text") -> torch.Tensor:
    # The whole text tokenized once (no special tokens) and cut into non-overlapping windows of `window`
    # tokens, (n, window); the last partial window is dropped, and said so.
    ids = _plain(tok).encode(text, add_special_tokens=False).ids
    n = len(ids) // window
    if n == 0:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one window of {window} (--drift-len)")
    print(f"data: eval text: {len(ids)} tokens -> {n} windows of {window} ({len(ids) - n * window} tail tokens unused)")
    return torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)


# a number as GSM8K answers write it: 72, -5, 1250.5, .5, 3/4 ("pages 10-12" gives 12, not -12)
_NUMBER = r"(?<![\d.])-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?"
# Where a model's answer ends: it may go on to invent the next problem (MetaMath's evaluation stops at these).
GSM8K_STOP = ("Question:", "Instruction:", "### Instruction", "Problem:", "Q:", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "</s>")


def _clean_numbers(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d)", "", text).replace("$", "")


def _value(number: str) -> float:
    num, _, den = number.partition("/")
    return float(num) / float(den) if den and float(den) != 0 else float(num)


def gsm8k_reference(answer: str) -> float:
    m = re.search(r"####\s*(" + _NUMBER + ")", _clean_numbers(answer))
    if m is None:
        raise DataError(f"GSM8K reference has no '#### n': {answer[-80:]!r}")
    return _value(m.group(1))


def gsm8k_first_answer(text: str) -> str:
    # the output up to the first stop marker: what the model answered to *this* question
    cut = min((i for i in (text.find(s) for s in GSM8K_STOP) if i >= 0), default=len(text))
    return text[:cut]


def extract_gsm8k_answer(text: str) -> float | None:
    # Model output -> number, from the first answer only (gsm8k_first_answer): after the first "The answer is",
    # else after the first "####", else the last number of that answer; None when it has no number at all.
    text = _clean_numbers(gsm8k_first_answer(text))
    for marker in (r"[Tt]he (?:final )?answer is", r"####"):
        hit = re.search(marker + r"\s*:?\s*(" + _NUMBER + ")", text)
        if hit:
            return _value(hit.group(1))
    numbers = re.findall(_NUMBER, text)
    return _value(numbers[-1]) if numbers else None
