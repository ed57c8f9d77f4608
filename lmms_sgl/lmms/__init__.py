"""lmms-eval adapters: ``sgl_internvl2``, ``sgl_llava``, ``sgl_qwen2_vl`` (entry-point targets).

The top of the stack: may import the pipeline, families, method and reporting.
"""
