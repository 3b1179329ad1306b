"""Constructor checks shared by the layers: widths, heads, dropout, what ``eval()`` computes.

The hash hyperparameters (``num_hashes``, ``hash_bits``, ``mode``, ``hashing``, ``backward``, and the
Hadamard limit ``hash_bits <= D'`` for the head dim) are yoso's rules, checked by the public
:func:`yoso.check_options` so a layer refuses exactly what a ``yoso.attention`` call would, when it is built
rather than on its first batch.
"""

from __future__ import annotations

import numbers

import yoso

# What a layer computes in eval(): YOSO-E (deterministic), or the sampled estimator.
EVAL_MODES = ("expectation", "sample")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")


def check_dropout(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


def check_layer(*, width_name: str, width, num_heads, num_hashes, hash_bits, mode, hashing, backward, eval_mode) -> int:
    """Check a multi-head layer's shape and hyperparameters; returns the head dim ``width // num_heads``."""
    check_positive_int(width_name, width)
    check_positive_int("num_heads", num_heads)
    if width % num_heads:
        raise ValueError(f"{width_name}={width} must be divisible by num_heads={num_heads}")
    head_dim = int(width) // int(num_heads)
    yoso.check_options(
        num_hashes=num_hashes, hash_bits=hash_bits, mode=mode, hashing=hashing, backward=backward, head_dim=head_dim
    )
    check_choice("eval_mode", eval_mode, EVAL_MODES)
    return head_dim
