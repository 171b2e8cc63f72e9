"""Tiny random checkpoints of each model family lopper reads, with transformers' logits.

    python scripts/make_family_fixtures.py tests/fixtures/families

For each family (LLaMA-2 style multi-head attention; LLaMA-3 style GQA with `llama3` RoPE
scaling; Mistral; Qwen2 with q/k/v biases and a tied head) it builds the model from a config
with transformers' own classes, seeds it, perturbs the norm scales and biases (their default
initialisation is constant, which would hide a wrong formula), and writes into DIR/<family>/:
config.json, model.safetensors (float32), tokenizer.json (a word-level vocabulary, only so
that the directory is complete) and logits.json (the token ids and transformers' float32
logits for every position). `crates/lopper-model/tests/families.rs` checks lopper's logits
against them. Needs torch, transformers and safetensors (a scratch venv).
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)

FAMILIES = {
    # LLaMA-1/2 (and Vicuna): multi-head attention, a KV group is one head.
    "llama2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4,
                   rope_theta=10000.0, tie_word_embeddings=False),
    # LLaMA-3/3.1: GQA, llama3 RoPE scaling, untied head.
    "llama3": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                   rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral: GQA; the window is longer than the fixture's sequence.
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, rope_theta=1000000.0, sliding_window=128,
                    tie_word_embeddings=False),
    # Qwen2/2.5: q/k/v biases, tied head (as the 0.5B-3B models).
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
}

IDS = [3, 17, 42, 5, 88, 61, 0, 23, 95, 7, 50, 33]


def main(out_root):
    for name, extra in FAMILIES.items():
        torch.manual_seed(1234)
        kw = dict(COMMON)
        kw.update(extra)
        model_type = kw.pop("model_type")
        config = AutoConfig.for_model(model_type, **kw)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif "norm" in pname:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.15)
            logits = model(torch.tensor([IDS])).logits[0]
        d = os.path.join(out_root, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        for extra_file in ("generation_config.json",):
            p = os.path.join(d, extra_file)
            if os.path.exists(p):
                os.remove(p)
        vocab = {f"t{i}": i for i in range(COMMON["vocab_size"])}
        tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
               "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
               "post_processor": None, "decoder": None,
               "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(tok, f)
        with open(os.path.join(d, "logits.json"), "w") as f:
            json.dump({"family": name, "transformers": transformers.__version__,
                       "torch": torch.__version__, "ids": IDS,
                       "logits": [[round(v, 6) for v in row] for row in logits.tolist()]}, f)
        print(name, type(model).__name__, "params", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main(sys.argv[1])
