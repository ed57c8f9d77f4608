"""Checkpoint files before anything loads: integrity checks and the original-InternVL converter.

May import ``lmms_sgl.method``; never families, the pipeline or lmms-eval.
"""
