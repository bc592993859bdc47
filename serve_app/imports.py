"""Heavy libraries as a replica imports them: each without an optional dependency it would import
but serving never calls (torch for Feast, scikit-learn for XGBoost: ~250 and ~60 MiB per process).

Both libraries import the dependency inside `try: ... except ImportError` and only lose the feature
that needs it (Feast `OnlineResponse.to_tensor`, the XGBoost scikit-learn estimators). So while the
library is first imported the dependency is made unimportable (a None entry in `sys.modules`), then
importable again: a later `import torch` (training, in the same process) works as usual.
A process that has imported the library or the dependency already (training, tests) is left as is.
"""

from __future__ import annotations

import importlib
import sys


def import_without(module: str, unused: str) -> None:
    """Import `module` (if not imported yet) with `unused` unimportable meanwhile."""
    if module in sys.modules or unused in sys.modules:
        importlib.import_module(module)
        return
    sys.modules[unused] = None  # type: ignore[assignment]
    try:
        importlib.import_module(module)
    finally:
        if unused in sys.modules and sys.modules[unused] is None:
            del sys.modules[unused]


def import_feast() -> None:
    """Feast without torch: `feast/__init__` imports `feast.torch_wrapper`, whose only job is
    `import torch`, for tensors serving never asks for."""
    import_without("feast", "torch")


def import_xgboost() -> None:
    """XGBoost without scikit-learn: serving predicts with a `Booster`, never an `XGBRanker`."""
    import_without("xgboost", "sklearn")
