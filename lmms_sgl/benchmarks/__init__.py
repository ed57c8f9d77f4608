"""Benchmarks: time, memory and FLOPs of the method on scaled-down real-shaped models, as ratios.

May import every lower package (method, families, pipeline, factory, reporting); nothing imports it.
"""
