"""lmms-eval adapters: ``sgl_internvl2`` and ``sgl_llava`` (entry-point targets)."""
