"""blockserve: a multi-user LLM inference server on MLX with a paged KV prefix cache.

The parts live in sibling folders of the repository and install as subpackages:
``blockserve.kvpool`` (the block pool), ``blockserve.scheduler``, ``blockserve.engine``
(everything MLX), ``blockserve.server`` (HTTP) and ``blockserve.bench``. This package
holds the one place that wires them together (``stack``) and the command line (``cli``).
"""

__version__ = "0.1.0"
