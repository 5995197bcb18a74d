"""Scoring: the kernels that turn stored signals or gradients into `[n_query, n_train]` scores (`kernels`), and
the one writer of a scoring's files (`writer`)."""

from .kernels import *  # noqa: F403 (the kernels' public names, listed in kernels.__all__)
from .kernels import __all__ as _kernels
from .writer import *  # noqa: F403 (the writer's public names, listed in writer.__all__)
from .writer import __all__ as _writer

__all__ = [*_kernels, *_writer]
