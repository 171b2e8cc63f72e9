"""Load a lopper GGUF export with llama.cpp (the llama-cpp-python package) and compare its logits
with lopper's on the same tokens.

    cargo xtask export --plan plan.json --format gguf --gguf-type f16 --out OUT
    cargo xtask logits --model OUT --ids 504,3458,282,4649,314,2213,28,378,1059,253 --out lopper.json
    python scripts/check_llama_cpp.py OUT/model.gguf lopper.json
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

gguf, ref_path = sys.argv[1], sys.argv[2]
ref = json.load(open(ref_path))
ids = ref["ids"]
llm = Llama(model_path=gguf, n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=2)
# The tokenizer metadata must reproduce lopper's token ids too.
text = ref.get("text")
llm.eval(ids)
ours = np.array(ref["logits"], dtype=np.float32)
theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
print(
    "llama.cpp loaded", gguf,
    "| layers", llm.metadata.get("llama.block_count"),
    "| max|diff|", float(np.abs(theirs - ours).max()),
    "| max|logit|", float(np.abs(ours).max()),
    "| argmax agreement", float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
)
