"""deltalora: behaviour-aware data-to-LoRA generation."""

__version__ = "0.1.0"
