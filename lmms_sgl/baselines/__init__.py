"""The competitors SGL is measured against, each through the same pruner, batching, records and
FLOPs accounting as SGL (``lmms_sgl.method``):

* :mod:`.fastv`: the large model's own last-token attention at layer K-1 (FastV, ECCV 2024);
* :mod:`.random_tokens`: seeded random visual tokens;
* :mod:`.divprune`, :mod:`.visionzip`, :mod:`.pdrop`: the 2025 training-free methods, each
  following its official code (named in its module).

Each module holds its rule and one :class:`~lmms_sgl.method.registry.KeepMethod` registered by name.
It may import torch, transformers and ``lmms_sgl.method`` only (``tests/test_layout.py``); the
registry imports a baseline by its module name on first look-up.
"""
