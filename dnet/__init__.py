"""dnet: distributed LLM inference over a ring of MLX peers."""

__version__ = "0.1.0"
