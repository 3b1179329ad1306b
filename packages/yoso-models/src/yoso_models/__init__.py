"""yoso_models: model layers and integrations built on yoso's public API only.

    from yoso_models.nn import YosoSelfAttention        # torch layer          (pip install "yoso-models[torch]")
    from yoso_models.nnx import YosoAttention           # Flax NNX module      (pip install "yoso-models[flax]")
    from yoso_models import transformers as yoso_hf     # Hugging Face models  (pip install "yoso-models[transformers]")

Each submodule imports its framework, so it loads on first access: ``import yoso_models`` imports none of
torch, flax or transformers.
"""

__version__ = "0.1.0"

_SUBMODULES = ("nn", "nnx", "transformers")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__"]
