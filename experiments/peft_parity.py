# experiments/peft_parity.py: does the adapter each script writes give the project's own logits where users take
# it? For both scripts on their default models and each init (lora, pissa, pissa_niter_4), a short real run
# (--max-steps 2, the default data), then OUT/adapter loaded with peft's PeftModel.from_pretrained onto the
# untouched transformers model, against model.py with the same adapter (balora.load_adapter): max |Δ| of the logits.
# Run: `python experiments/peft_parity.py [--inits lora,pissa,pissa_niter_4]` (needs transformers and peft).

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balora  # noqa: E402
import data  # noqa: E402
import model as modellib  # noqa: E402
import train_nlg  # noqa: E402
import train_nlu  # noqa: E402
from plumbing import assets  # noqa: E402


def nlu(init, out):
    flags = ["--init", init, "--max-steps", "2", "--dtype", "fp32", "--out", str(out)]
    train_nlu.main(flags)
    args = train_nlu.parse_args(flags)
    args.model, args.device = str(assets.minilm_dir()), "cpu"
    torch.manual_seed(args.seed)  # as main(): LoRA's init draws from it
    ours = train_nlu.build_model(args, 2).eval()
    balora.load_adapter(ours, out / "adapter")
    from peft import PeftModel
    from transformers import BertForSequenceClassification
    hf = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    theirs = PeftModel.from_pretrained(hf, out / "adapter").eval()
    texts = data.movie_reviews(assets.vader_dir(), "binary")["test"]
    ex, _ = data.encode_classification(modellib.load_tokenizer(args.model), texts, 64)
    b = data.collate_classification(ex[:64], 0)
    with torch.no_grad():
        z = train_nlu.logits_of(ours, b)
        z_hf = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      token_type_ids=b["token_type_ids"]).logits
    return (z - z_hf).abs().max().item(), z.abs().max().item()


def nlg(init, out):
    flags = ["--init", init, "--max-steps", "2", "--dtype", "fp32", "--val-examples", "8", "--drift-windows", "2",
             "--gen-prompts", "2", "--gen-tokens", "4", "--out", str(out)]
    train_nlg.main(flags)
    args = train_nlg.parse_args(flags)
    args.model, args.device = str(assets.smollm2_dir()), "cpu"
    ours, _, _ = train_nlg.build_model(args)  # seeds as main() does, then injects (no data: no base metrics)
    balora.load_adapter(ours, out / "adapter")
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(args.model), out / "adapter").eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, z_hf = ours.eval()(ids), theirs(input_ids=ids).logits
    return (z - z_hf).abs().max().item(), z.abs().max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description="peft loads of both scripts' adapters on the default models")
    p.add_argument("--inits", default="lora,pissa,pissa_niter_4")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("train_nlu.py", nlu), ("train_nlg.py", nlg)):
            for init in args.inits.split(","):
                out = Path(tmp) / f"{name}-{init}"
                rows.append((name, init, *fn(init, out)))
    print("| script | init | max abs diff of logits | logit scale (max abs) | diff / scale |")
    print("|---|---|---|---|---|")
    for name, init, delta, scale in rows:
        print(f"| {name} | {init} | {delta:.2e} | {scale:.1f} | {delta / scale:.1e} |")
    return rows


if __name__ == "__main__":
    main()
