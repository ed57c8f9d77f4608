"""Reporting: run statistics, where they go (results.json, console, W&B), and marked report sections.

Reads sample records as plain data; may import ``lmms_sgl.method`` only, never models or adapters.
"""
