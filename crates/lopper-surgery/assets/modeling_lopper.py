"""LLaMA-family decoders whose layers differ in width, as lopper's structural pruning leaves them.

lopper writes this file next to a pruned model whose layers are not all alike, and names it in
the model's ``config.json`` (``auto_map``), so that stock transformers loads the model with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``config.json`` is a LLaMA configuration (the widest layer's sizes) plus ``lopper_layer_config``:
a list with one entry per decoder layer with its ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size``. Zero key/value heads means the layer's attention block was removed, a
zero ``intermediate_size`` that its MLP was; a removed block adds nothing to the residual
stream and has no weights (its RMSNorm was removed with it). Every layer keeps ``head_dim``.

Each layer is transformers' own ``LlamaDecoderLayer`` built with that layer's sizes, so
attention kernels, RoPE scaling, biases and generation are transformers' own. Checked with transformers 5.24 (lopper's
``scripts/check_transformers.py``: logits and cached generation).
"""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel


class LopperLlamaConfig(LlamaConfig):
    """A LLaMA configuration with ``lopper_layer_config`` (kept as given). Not transformers' own
    ``per_layer_config``, whose format and modelling differ between releases."""

    model_type = "lopper_llama"


def _layer_config(config, index):
    """``config`` with the sizes of decoder layer ``index`` (at least one head and one channel,
    so that the stock modules can be built; removed blocks are replaced afterwards)."""
    spec = config.lopper_layer_config[index]
    layer = copy.copy(config)
    layer.num_attention_heads = max(int(spec["num_attention_heads"]), 1)
    layer.num_key_value_heads = max(int(spec["num_key_value_heads"]), 1)
    layer.intermediate_size = max(int(spec["intermediate_size"]), 1)
    layer.head_dim = config.head_dim
    return layer


def _cache_of(kwargs):
    """The key/value cache a decoder layer was given, whatever this transformers calls it."""
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class RemovedAttention(nn.Module):
    """An attention block that was pruned away: it adds zero to the residual stream. With a
    cache, it appends key/value entries with zero heads, so that the cache still counts the
    tokens seen at this layer (transformers reads positions from the first layer's entries)."""

    def __init__(self, layer_idx, head_dim):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states, *args, **kwargs):
        cache = _cache_of(kwargs)
        if cache is not None:
            batch, tokens = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, tokens, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMlp(nn.Module):
    """An MLP block that was pruned away: it adds zero to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class LopperDecoderLayer(LlamaDecoderLayer):
    """transformers' LLaMA decoder layer with this layer's sizes; removed blocks add zero."""

    def __init__(self, config, layer_idx):
        super().__init__(_layer_config(config, layer_idx), layer_idx)
        spec = config.lopper_layer_config[layer_idx]
        if int(spec["num_key_value_heads"]) == 0:
            self.self_attn = RemovedAttention(layer_idx, config.head_dim)
            self.input_layernorm = nn.Identity()
        if int(spec["intermediate_size"]) == 0:
            self.mlp = RemovedMlp()
            self.post_attention_layernorm = nn.Identity()


class LopperLlamaModel(LlamaModel):
    """The decoder stack, one ``LopperDecoderLayer`` per entry of ``lopper_layer_config``."""

    config_class = LopperLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        if len(config.lopper_layer_config) != config.num_hidden_layers:
            raise ValueError(
                f"lopper_layer_config has {len(config.lopper_layer_config)} entries for "
                f"num_hidden_layers = {config.num_hidden_layers}"
            )
        self.layers = nn.ModuleList(
            LopperDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.post_init()


class LopperLlamaForCausalLM(LlamaForCausalLM):
    """A causal LM over ``LopperLlamaModel``."""

    config_class = LopperLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LopperLlamaModel(config)
        self.post_init()
