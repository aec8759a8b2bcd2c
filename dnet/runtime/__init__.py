"""The sliced MLX runtime: the only package that imports mlx and mlx_lm.

This ``__init__`` imports nothing heavy on purpose, so ``dnet.runtime.blas`` can load
a fast BLAS before anything imports ``mlx.core``. Import the submodules you need:

- ``model_dir``: resolve a model reference and read its config and tensor index
- ``slice``: build and run the layers ``[start, end)`` of a model
- ``engine``: per-request KV caches and sampling around a slice
- ``compute``: the one thread that runs all MLX work of a process
- ``local``: drive a chain of slices in one process (demo, tests, bench)
- ``tiny``: make deterministic tiny models offline
"""
