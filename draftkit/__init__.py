"""draftkit: turn language models into fast, well-aligned draft models for speculative decoding."""

__version__ = "0.1.0"

__all__ = ["__version__"]
