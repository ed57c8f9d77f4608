"""``lmms-sgl-cost``: what each method costs on real checkpoints, from their ``config.json`` alone.

May import ``lmms_sgl.method`` (the formulas), ``lmms_sgl.families`` (per-unit vision FLOPs from a
config) and ``lmms_sgl.checkpoints`` (original-layout configs); never models, the pipeline or lmms-eval.
"""
