"""Attention mechanisms as ``nn.Module`` building blocks (timm's ``layers`` idiom).

Each module's docstring names its paper and the tensor shapes it takes and returns.
"""

from core_attention.layers.attention_gate import AttentionGate
from core_attention.layers.attentive_pooling import AttentiveStatisticsPooling
from core_attention.layers.bilevel_routing import BiLevelRoutingAttention
from core_attention.layers.halo import HaloAttention
from core_attention.layers.multi_condition import MultiConditionCrossAttention
from core_attention.layers.multi_head import MultiHeadAttention
from core_attention.layers.rotary import RotaryEmbedding, apply_rotary
from core_attention.layers.squeeze_excite import SqueezeExcitation1d, SqueezeExcitation2d
from core_attention.layers.time_frequency import TimeFrequencyAttention

__all__ = [
    "AttentionGate",
    "AttentiveStatisticsPooling",
    "BiLevelRoutingAttention",
    "HaloAttention",
    "MultiConditionCrossAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SqueezeExcitation1d",
    "SqueezeExcitation2d",
    "TimeFrequencyAttention",
    "apply_rotary",
]
