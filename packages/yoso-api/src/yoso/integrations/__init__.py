"""Integrations of yoso with other libraries; each submodule imports its library on first use.

- :mod:`yoso.integrations.transformers`: Hugging Face transformers (``attn_implementation="yoso"`` for
  BERT-family models, and kernels for transformers' own ``YosoModel``).
"""
