"""The SGL method: importance recording, keep sets, layer-K pruning, exit scores, cost model.

Pure tensor code over transformers' seams; imports torch and transformers only, nothing else of the project.
"""
