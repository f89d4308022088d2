"""The model side, by job: ``models`` (getting a model: resolve, the built-in one, demo
models, GGUF files), ``runtime`` (the MLX batch thread, sampling, blocks <-> KV caches,
the BLAS preload) and ``text`` (the tokenizer frontend, chat templates, the output parser,
grammars, streaming text), which the server uses and which imports no MLX.

This package root imports nothing, so ``text`` stays MLX-free; ``runtime`` and
``models`` load MLX (after the system BLAS, see ``runtime``)."""
