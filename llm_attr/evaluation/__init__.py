"""Evaluation of attribution scores: retrieval metrics, LDS, removal studies, reports."""

from .metrics import average_precision, lds, precision_at_k, recall_at_k, retrieval_summary

__all__ = ["average_precision", "lds", "precision_at_k", "recall_at_k", "retrieval_summary"]
