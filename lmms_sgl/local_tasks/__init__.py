"""Data and prompt functions of the local lmms-eval tasks in ``tasks/`` (no dataset hub needed).

May import ``lmms_sgl.proving`` (the shapes benchmark's scenes); the tasks' ``utils.py`` import it.
"""
