"""Proving ground: the procedural shapes benchmark, the trained small pairs and the study on them.

May import every lower package (method, families, factory, reporting, calibration); nothing imports it but
``local_tasks`` (the benchmark's data).
"""
