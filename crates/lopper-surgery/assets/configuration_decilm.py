"""The configuration of a lopper export in vLLM's DeciLM (``nemotron-nas``) layout.

lopper writes this file next to a model exported with ``--format vllm`` and names it in the
model's ``config.json`` (``auto_map``). vLLM's ``DeciLMForCausalLM`` builds each decoder layer
from ``config.block_configs[i]`` by attribute access (``block.attention.no_op``,
``block.attention.n_heads_in_group``, ``block.ffn.no_op``, ``block.ffn.intermediate_size``);
this class turns the JSON objects of ``block_configs`` into such objects and back, so that

    vllm serve FOLDER --trust-remote-code

loads the pruned model: attention layers keep every query head with
``num_attention_heads // n_heads_in_group`` key/value heads, each MLP has its own
``intermediate_size``, and a removed block is a ``no_op`` (no weights, no RMSNorm).
"""

from dataclasses import asdict, dataclass

from transformers import LlamaConfig


@dataclass
class AttentionBlock:
    """One layer's attention: removed (``no_op``) or ``n_heads_in_group`` query heads per
    key/value head."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None


@dataclass
class FfnBlock:
    """One layer's MLP: removed (``no_op``) or ``intermediate_size`` channels."""

    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None


@dataclass
class BlockConfig:
    """One decoder layer."""

    attention: AttentionBlock
    ffn: FfnBlock

    @classmethod
    def parse(cls, value):
        if isinstance(value, BlockConfig):
            return value
        return cls(AttentionBlock(**value["attention"]), FfnBlock(**value["ffn"]))


class DeciLMConfig(LlamaConfig):
    """A LLaMA configuration with per-layer ``block_configs``."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [BlockConfig.parse(b) for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [asdict(b) for b in self.block_configs]
        return out
