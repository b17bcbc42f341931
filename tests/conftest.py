# tests/conftest.py: the fixtures every test file may use. The tiny transformers checkpoints (`ckpt`) come from
# test_balora.py, where the models are proven equal to transformers; the tiny BERT / LLaMA runs and their data files
# from tests/helpers.py.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project's modules and helpers.py, from any working directory

from helpers import encoders, files, tiny_llama  # noqa: E402,F401  fixtures
from test_balora import ckpt  # noqa: E402,F401  fixture
