"""Check a `cargo xtask export --format vllm` folder against vLLM's DeciLM (nemotron-nas) rules.

    cargo xtask export --model M --plan plan.json --format vllm --out DIR
    python scripts/check_vllm_export.py DIR

Loads `config.json` through its `auto_map` (transformers, trust_remote_code), then derives every
layer's modules the way vLLM's `DeciLMDecoderLayer` does from `block_configs` (query heads
`num_attention_heads` in every attention layer, key/value heads `num_attention_heads //
n_heads_in_group`, `ffn.intermediate_size` or the width of `ffn.ffn_mult`, no module and no
RMSNorm for a `no_op` block, biases from `attention_bias` / `mlp_bias`) and checks that the
safetensors hold exactly those tensors with those shapes. Exits non-zero on any mismatch.
"""

import sys

from safetensors import safe_open
from transformers import AutoConfig


def ffn_width(ffn, hidden):
    if getattr(ffn, "intermediate_size", None) is not None:
        return ffn.intermediate_size
    width = int(2 * ffn.ffn_mult * hidden / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def expected_tensors(config):
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    out = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, hidden)
    for i, block in enumerate(config.block_configs):
        p = f"model.layers.{i}"
        if not block.attention.no_op:
            kv = heads // block.attention.n_heads_in_group
            out[f"{p}.input_layernorm.weight"] = (hidden,)
            for name, rows, cols in [
                ("q_proj", heads * head_dim, hidden),
                ("k_proj", kv * head_dim, hidden),
                ("v_proj", kv * head_dim, hidden),
                ("o_proj", hidden, heads * head_dim),
            ]:
                out[f"{p}.self_attn.{name}.weight"] = (rows, cols)
                if attn_bias:
                    out[f"{p}.self_attn.{name}.bias"] = (rows,)
        if not block.ffn.no_op:
            width = ffn_width(block.ffn, hidden)
            out[f"{p}.post_attention_layernorm.weight"] = (hidden,)
            for name, rows, cols in [
                ("gate_proj", width, hidden),
                ("up_proj", width, hidden),
                ("down_proj", hidden, width),
            ]:
                out[f"{p}.mlp.{name}.weight"] = (rows, cols)
                if mlp_bias:
                    out[f"{p}.mlp.{name}.bias"] = (rows,)
    return out


def main(folder):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "nemotron-nas", config.model_type
    assert config.architectures == ["DeciLMForCausalLM"], config.architectures
    assert len(config.block_configs) == config.num_hidden_layers
    for block in config.block_configs:
        if not block.attention.no_op:
            assert config.num_attention_heads % block.attention.n_heads_in_group == 0
    want = expected_tensors(config)
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    for k in wrong:
        print("shape", k, "config says", want[k], "file has", have[k])
    print(
        f"{folder}: {config.num_hidden_layers} layers, "
        f"{sum(b.attention.no_op for b in config.block_configs)} attention and "
        f"{sum(b.ffn.no_op for b in config.block_configs)} MLP blocks no_op; "
        f"{len(want)} tensors expected, missing {missing[:5]}, extra {extra[:5]}, "
        f"wrong shapes {len(wrong)}"
    )
    if missing or extra or wrong:
        sys.exit(1)
    print("matches vLLM's DeciLM layout")


if __name__ == "__main__":
    main(sys.argv[1])
