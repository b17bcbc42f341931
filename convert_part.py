# temporary shim while train_nlg.py still imports convert_part; the code now lives in data.py
from data import convert_gguf, unpermute_qk, build_tokenizer  # noqa: F401
