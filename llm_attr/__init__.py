"""llm_attr: which training examples made my fine-tuned model do this?"""

__version__ = "0.1.0"

_METHODS = ("Daunce", "DaunceConfig", "GradientAttribution", "GradientConfig")


def __getattr__(name: str):
    """`llm_attr.GradientAttribution` etc., imported from `llm_attr.methods` on first use."""
    if name in _METHODS:
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'llm_attr' has no attribute {name!r}")
