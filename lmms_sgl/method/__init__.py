"""The SGL method and the seams every method shares: importance recording, keep sets, layer-K
pruning, exit scores, cost model, and the registry of methods by name (the baselines themselves are
in ``lmms_sgl.baselines``).

Pure tensor code over transformers' seams; imports torch and transformers only, nothing else of the project.
"""
