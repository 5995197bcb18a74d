"""Errors a user can act on: each names the file, the record and the field where it can."""


class LlmAttrError(Exception):
    """Base class: the CLI prints these as one line (no traceback unless --debug) and exits non-zero."""


class ConfigError(LlmAttrError):
    """A config file or `--set` override is invalid."""


class DataError(LlmAttrError):
    """A data file or record is invalid."""


class ModelError(LlmAttrError):
    """A model, tokenizer or adapter cannot be loaded or used as asked."""


class RunDirError(LlmAttrError):
    """A run directory is incomplete, or belongs to a different config/model."""


class DiskFullError(LlmAttrError):
    """A write failed because the disk (or quota) is full; the file it replaces is left as it was."""
