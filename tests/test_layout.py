# tests/test_layout.py: checks of the layout, not proofs: each file's first line, which module imports which,
# and that the documents link what exists and speak in the present tense.

import re

import torch
import transformers  # the reference the hand-written models are checked against; test-only


torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


PLUMBING = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "plumbing").glob("*.py"))
TOP_MODULES = ["balora.py", "model.py", "data.py", "train_nlu.py", "train_nlg.py", "test_balora.py", *PLUMBING,
               "experiments/study.py", "experiments/bench.py", "experiments/plot_log.py"]


def imports_of(path):
    import ast
    tree = ast.parse((HERE / path).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_states_its_one_concern_and_imports_flow_one_way():
    for f in TOP_MODULES:
        first = (HERE / f).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(f"# {f}") and len(first) > len(f) + 12, (f, first)
    project = {"balora", "model", "data", "train_nlu", "train_nlg", "plumbing", "experiments", "study", "bench"}
    ours = lambda f: {n for n in imports_of(f) if n in project or n.startswith(("plumbing", "experiments"))}
    assert ours("balora.py") == set()  # copied alone, it works
    assert ours("model.py") == {"balora"} and ours("data.py") == set()  # a learner can skip plumbing/
    assert ours("plumbing/gguf_to_hf.py") == {"balora", "model"}
    assert ours("plumbing/assets.py") == {"balora", "plumbing.gguf_to_hf"}
    # plumbing/ imports the method, the models and the data (for their error classes and JSON), never a script or an
    # experiment, and its modules import each other one way (no cycle)
    deps = {f: {n for n in ours(f) if n.startswith("plumbing.")} for f in PLUMBING}
    for f in PLUMBING:
        assert ours(f) - deps[f] <= {"balora", "data", "model"}, f
    done = set()
    while len(done) < len(PLUMBING):
        ready = {f for f in PLUMBING if f not in done and {d.replace(".", "/") + ".py" for d in deps[f]} <= done}
        assert ready, f"an import cycle among {sorted(set(PLUMBING) - done)}"
        done |= ready
    for script in ("train_nlu.py", "train_nlg.py"):
        assert ours(script) == {"balora", "data", "model", "plumbing"}
    model_src, data_src = (HERE / "model.py").read_text(), (HERE / "data.py").read_text()
    assert "torch.distributed" not in model_src and "cpu_capability" not in model_src
    assert "def cli(" not in data_src and "pip download" not in data_src and "__main__" not in data_src
    assert "subprocess" not in data_src and "sha256_file" not in data_src  # no fetcher in data.py


HISTORY = re.compile(r"\b(?:[Bb]efore,|\([Bb]efore\b|[Ee]arlier (?:version|table|README|run)s?|[Pp]revious "
                     r"(?:measurement|README|version|implementation)|was lent|this task|commit [0-9a-f]{7}|"
                     r"the issue reports)")


def test_readme_is_the_front_door_and_no_document_speaks_of_history():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 12_000
    assert re.search(r"^## .*\bown\b", readme, re.M)  # "Use balora.py in your own loop"
    docs = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        hits = HISTORY.findall(text)
        assert not hits, (doc.name, hits)
        for link in re.findall(r"\]\(([^)#]+\.(?:md|png))\)", text):  # every linked document exists
            assert (doc.parent / link).exists(), (doc.name, link)
