"""Cross-check of lopper's WikiText-2 perplexity protocol with HF transformers on the same model (a
GGUF file dequantised by transformers), the same rows, windows and arithmetic.

    python scripts/hf_perplexity.py FILE.gguf DIR_OF_FILE LIMIT SEQ_LEN wikitext2/wiki.test.raw
"""
import sys, math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]; d = sys.argv[2]; limit = int(sys.argv[3]); seq = int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(d, gguf_file=path)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=path, dtype=torch.float32)
torch.set_num_threads(2)
raw = open(sys.argv[5]).read()
rows = ["" if l.strip() == "" else l for l in raw.splitlines(keepends=True)]
ids = tok("\n\n".join(rows), add_special_tokens=False).input_ids
n = len(ids) // seq
nll, cnt = 0.0, 0
with torch.no_grad():
    for w in range(min(n, limit)):
        x = torch.tensor([ids[w*seq:(w+1)*seq]])
        out = model(x, labels=x)
        nll += out.loss.item() * (seq - 1); cnt += seq - 1
print(f"HF transformers: {len(ids)} tokens, windows {min(n,limit)} of {n}, ppl {math.exp(nll/cnt):.4f}")
