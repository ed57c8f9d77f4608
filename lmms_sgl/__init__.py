"""lmms-sgl: small-VLM guidance (SGL) for accelerating large VLMs, as an lmms-eval plugin.

Packages, bottom up: ``method`` (pure tensor code) < ``checkpoints`` < ``families`` < ``pipeline`` <
``lmms`` (the lmms-eval adapters); beside them ``reporting``, ``factory``, ``local_tasks``,
``benchmarks``, ``proving`` and ``calibration``. Each package may import only the ones its
docstring names (``tests/test_layout.py`` checks it).
"""

from lmms_sgl import _tv_compat  # noqa: F401  (installs the torchvision import fix; cheap)

__version__ = "0.1.0"
