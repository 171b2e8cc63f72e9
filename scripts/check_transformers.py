"""Load a lopper export with stock Hugging Face transformers and compare its logits with lopper's.

    cargo xtask logits --model DIR --ids 504,3458,282,4649,314,2213,28,378,1059,253 --out lopper.json
    python scripts/check_transformers.py DIR lopper.json
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

model_dir, ref_path = sys.argv[1], sys.argv[2]
# Heterogeneous exports carry their modelling file (auto_map): trust_remote_code loads it.
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True)
ref = json.load(open(ref_path))
ids = torch.tensor([ref["ids"]])
with torch.no_grad():
    logits = model(ids).logits[0]
ours = torch.tensor(ref["logits"])
print(
    type(model).__name__,
    "layers", model.config.num_hidden_layers,
    "max|diff|", (logits - ours).abs().max().item(),
    "argmax agreement", (logits.argmax(-1) == ours.argmax(-1)).float().mean().item(),
)

# Generation reads positions from the key/value cache; a layer whose attention was removed must
# keep it counting. Greedy decoding with the cache equals recomputing the whole sequence.
with torch.no_grad():
    cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
print("greedy generation with the cache equals without:", torch.equal(cached, seq))
