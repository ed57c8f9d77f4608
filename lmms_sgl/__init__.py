"""lmms-sgl: small-VLM guidance (SGL) for accelerating large VLMs, as an lmms-eval plugin."""

from lmms_sgl import _tv_compat  # noqa: F401  (installs the torchvision import fix; cheap)

__version__ = "0.1.0"
