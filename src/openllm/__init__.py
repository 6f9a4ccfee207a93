"""OpenLLM: train GPT-style language models from scratch, reproducibly, and ship them."""

__version__ = "0.1.0"
