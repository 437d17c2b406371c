"""draftkit: turn language models into fast, well-aligned draft models for speculative decoding."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # Lazy, so `import draftkit` does not import torch/transformers.
    if name == "load_model":
        from draftkit.export import load_model

        return load_model
    raise AttributeError(f"module 'draftkit' has no attribute {name!r}")
