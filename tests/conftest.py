# tests/conftest.py: the fixtures every test file may use: the tiny random transformers checkpoints (`ckpt`, from
# tests/reference_models.py, on which test_balora.py proves the models equal to transformers) and the tiny BERT /
# LLaMA runs and their data files (tests/helpers.py).
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project's modules and helpers.py, from any working directory

from helpers import encoders, files, tiny_llama  # noqa: E402,F401  fixtures
from reference_models import ckpt  # noqa: E402,F401  fixture
