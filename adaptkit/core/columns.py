"""The column names every per-layer report shares, defined once.

The tables of ``info``/``status`` (:func:`~adaptkit.live.status.checkpoint_status`), ``analyze``, ``compare``,
``convert``, ``extract``, ``loftq`` and the PiSSA/OLoRA/CorDA conversion name the same quantity the same way, so
a column means one thing in every table (``docs/cli.md`` lists them). Reports build their rows with these
constants; the test ``tests/test_params.py`` checks every report against them.
"""

from __future__ import annotations

#: the module path of the layer in the base model's namespace (``model.layers.0.self_attn.q_proj``)
MODULE = "module"
#: ``||dW||_F``, the Frobenius norm of the layer's update
DELTA_NORM = "delta_norm"
#: share of ``||dW||_F^2`` an approximation keeps, in ``[0, 1]`` (1.0: exact)
RETAINED_ENERGY = "retained_energy"
#: ``||dW - dW_approx||_F / ||dW||_F`` (0.0: exact); ``sqrt(1 - retained_energy)`` for a truncated SVD
RELATIVE_ERROR = "relative_error"

#: names that meant one of the above in earlier versions, and must not come back in a report
RETIRED = {"path": MODULE, "energy": RETAINED_ENERGY, "rel_error": RELATIVE_ERROR}

__all__ = ["DELTA_NORM", "MODULE", "RELATIVE_ERROR", "RETAINED_ENERGY", "RETIRED"]
