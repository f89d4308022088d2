"""The asyncio scheduler: queue, admission under budgets, cache-aware order, streams,
aborts. No MLX: it drives a generator through ``scheduler.protocol``."""
