"""LoRA adapters (vLLM's `enable_lora`): many fine-tunes served on one base model, chosen per request."""
from shardserve.lora.request import LoRARequest

__all__ = ["LoRARequest"]
