from shardserve.models.registry import resolve_model_class, supported_architectures

__all__ = ["resolve_model_class", "supported_architectures"]
