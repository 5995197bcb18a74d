"""Attribution methods: each turns a target model, training data and queries into a store and scores."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daunce import Daunce, DaunceConfig
    from .gradient_attribution import GradientAttribution, GradientConfig

#: public name -> the submodule defining it (imported on first use: `import llm_attr.methods` stays cheap)
_EXPORTS = {
    "Daunce": ".daunce",
    "DaunceConfig": ".daunce",
    "GradientAttribution": ".gradient_attribution",
    "GradientConfig": ".gradient_attribution",
}

__all__ = ["Daunce", "DaunceConfig", "GradientAttribution", "GradientConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
