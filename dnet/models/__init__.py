"""What a model is, read from its files: resolving a reference (directory, GGUF file,
HF cache, packaged short name), configs and tensor indexes, GGUF headers, tokenizers
and chat templates, and the model's profile for the solver.

Nothing here imports MLX: the head uses this package to plan, tokenize and stream
text without loading the runtime.
"""
