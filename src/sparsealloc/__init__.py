"""sparsealloc: layer-wise sparsity allocation for one-shot LLM pruning."""

__version__ = "0.1.0"
