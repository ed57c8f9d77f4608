"""Offline model factory: tiny deterministic checkpoints of every family and layout the project serves.

May import ``lmms_sgl.method`` and ``lmms_sgl.checkpoints`` (original-layout tokenizers); never the
pipeline or the adapters.
"""
