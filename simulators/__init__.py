"""Deterministic message streams and the fake servers that replay them.

Never imports ``bench``; from ``pipeline`` only the plain data in ``pipeline.model``.
"""
