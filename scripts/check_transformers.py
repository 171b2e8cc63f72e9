"""Load a lopper export with stock Hugging Face transformers and compare its logits with lopper's.

    cargo xtask logits --model DIR --ids 504,3458,282,4649,314,2213,28,378,1059,253 --out lopper.json
    python scripts/check_transformers.py DIR lopper.json
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

model_dir, ref_path = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
