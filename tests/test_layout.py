# tests/test_layout.py: checks of the layout, not proofs: which module imports which (balora.py alone works, a
# learner can skip plumbing/), and that every document a document links exists.

import re

import torch


torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


PLUMBING = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "plumbing").glob("*.py"))


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


def test_imports_flow_one_way():
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


def test_every_linked_document_exists():
    for doc in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(([^)#]+\.(?:md|png))\)", text):
            assert (doc.parent / link).exists(), (doc.name, link)
