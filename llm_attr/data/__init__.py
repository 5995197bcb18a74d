"""Records, tokenisation with response masks, and the built-in tasks."""

from .records import Record, load_records, save_jsonl
from .tokenize import Example, collate, tokenize_records

__all__ = ["Example", "Record", "collate", "load_records", "save_jsonl", "tokenize_records"]
