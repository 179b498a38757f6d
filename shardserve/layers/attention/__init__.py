from shardserve.layers.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend
from shardserve.layers.attention.layer import Attention, layer_sliding_window

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "get_attention_backend", "layer_sliding_window"]
