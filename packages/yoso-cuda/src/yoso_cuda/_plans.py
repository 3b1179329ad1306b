"""Launch-plan arithmetic that both the backend's limits (``backend.py``) and its launches (``_ops.py``)
need: pure Python, so that loading the backend imports neither torch nor the CUDA bindings.
"""

from __future__ import annotations

import math

SMEM_BUDGET = 96 * 1024  # dynamic shared memory per block; leaves room for two blocks per SM on sm_80/sm_90

# The forms of the lower-bound gradient (docs/math.md#lower-bound); the values are FORM_* in common.cuh.
FORMS = {"pairs": 0, "tables": 1, "auto": 2}

# The table kernel (sampled_tables.cu): (TILE rows per tile, DS columns of D per block). 256 threads tile
# [TILE][DS] exactly, so TILE * DS >= 256 and DS divides 256. Each one is compiled for three dtypes at
# first use, so the list is short: DS = 64 keeps D = 64 in one slice, (16, 32) fits Dv = 256 (69 KiB).
TABLE_CONFIGS = ((32, 64), (32, 32), (16, 32))


def table_smem(tile: int, ds: int, value_dim: int) -> int:
    """Bytes of shared memory of ``sampled_grads_tables<T, tile, ds>`` (the layout in sampled_tables.cu):
    Zs, Xs [tile][Dv+1], Ys [tile][ds+1], the table S [Dv][ds], pair weights [tile][tile+1], 3 int rows."""
    floats = 2 * tile * (value_dim + 1) + tile * (ds + 1) + value_dim * ds + tile * (tile + 1)
    return 4 * floats + 4 * 3 * tile


def table_plan(dim: int, value_dim: int, budget: int | None = None) -> tuple[int, int] | None:
    """(TILE, DS) for the table kernel at head dims ``dim``, ``value_dim``, or None if none fits ``budget``
    bytes (default: SMEM_BUDGET).

    Fewest column slices first (each slice re-reads the Dv-wide rows and recomputes the pair weights),
    then the larger tile, then the narrower slice (fewer idle columns).
    """
    budget = SMEM_BUDGET if budget is None else budget
    fitting = [(tile, ds) for tile, ds in TABLE_CONFIGS if table_smem(tile, ds, value_dim) <= budget]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (math.ceil(dim / c[1]), -c[0], c[1]))


def table_slices(dim: int, plan: tuple[int, int]) -> int:
    """Column slices of D (blocks per bucket and role, grid y = 2 * slices) under ``plan`` = (TILE, DS)."""
    return math.ceil(dim / plan[1])


# Blocks of one table-kernel launch (about 15 per SM of an H100): each block loops over buckets
# x, x + gridDim.x, ... so that the launch stays cheap when few buckets take the table form.
TABLE_BLOCKS = 2048


def table_grid(hash_bits: int, slices: int, batch: int) -> tuple[int, int, int]:
    """The table kernel's grid: (bucket blocks per row, dq and dk slices, batch rows)."""
    return min(1 << hash_bits, max(1, TABLE_BLOCKS // (2 * slices * batch))), 2 * slices, batch


def bucket_form(form: int, n_query: int, n_key: int, dim: int, value_dim: int) -> str:
    """ "pairs" or "tables": what the kernels decide for one bucket (use_tables in common.cuh, same
    float64 arithmetic): forced, or, for "auto", the table form where it costs fewer multiply-adds,
    2 (nq + nk) D Dv against nq nk (Dv + 2 D)."""
    if form != FORMS["auto"]:
        return "tables" if form == FORMS["tables"] else "pairs"
    pairs = float(n_query) * float(n_key) * float(value_dim + 2 * dim)
    tables = 2.0 * float(n_query + n_key) * float(dim) * float(value_dim)
    return "tables" if tables < pairs else "pairs"


def lower_bound_form(form: str, backward: str) -> int:
    """The kernels' form code for ``sampled_grads(..., backward, form)``; ValueError naming ``form``.

    The importance-weighted gradient (``backward="exact"``) weighs every pair by its own cosine, so it
    has no table form: "auto" means pairs there, and "tables" is refused.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    if backward != "lower_bound":
        if form == "tables":
            raise ValueError(
                f"form='tables' needs backward='lower_bound' (got backward={backward!r}): the importance-"
                "weighted gradient weighs each pair by its cosine and has no table form"
            )
        return FORMS["pairs"]
    return FORMS[form]


# add_to_tables: up to this many tokens a chunk walks its tokens into a copy of the running tables
# (bucket_tables_walk: O(m C) per token, but a serial chain of N read-modify-writes per thread); longer
# chunks sum each bucket's run in parallel and add it to the old entries (bucket_tables_sum with a base).
ADD_WALK_MAX_TOKENS = 64
