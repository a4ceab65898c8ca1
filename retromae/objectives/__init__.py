"""Pretraining objectives. Every module in this package is imported, so defining a registered objective in a
new file is all it takes to make it available by name."""

import importlib
import pkgutil

from retromae.objectives.base import (  # noqa: F401
    Objective,
    ObjectiveConfig,
    build_objective_config,
    objective_class,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
