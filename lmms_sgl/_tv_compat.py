"""Make ``import torchvision`` survive a CUDA torchvision wheel beside a CPU torch.

Every torchvision wheel on the package registry is a CUDA build. Beside the CPU torch its native
library ``_C.so`` cannot load (it links ``libtorch_cuda.so``); torchvision notices that quietly, but
its ``_meta_registrations`` module then registers fake kernels for ``torchvision::nms``/``qnms``
without checking, and the import crashes with ``operator torchvision::nms does not exist``. That
breaks ``transformers.image_utils`` and with it the lmms-eval evaluator.

The fix defines the two operator *schemas* (no kernels) before torchvision is imported, so the fake
registrations succeed. The pure-Python parts we use (transforms, resize) work; ``torchvision.ops.nms``
would still raise, and nothing on our path calls it. Where ``_C.so`` loads (a matching CUDA torch on
a GPU machine) this module does nothing.

Importing this module only installs an import hook (a ``sys.meta_path`` finder) that applies the fix
the first time anything imports ``torchvision``; interpreter start-up stays cheap because torch is not
imported until then. It is imported by ``lmms_sgl/__init__.py`` and, so that the plain ``lmms-eval``
command works too, by the ``lmms_sgl_torchvision_compat.pth`` file that installing this package puts in
site-packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # the torch.library.Library must stay alive for the schemas to stay defined


def ensure_torchvision_importable() -> str:
    """Return what was done: already-imported, not-installed, native-ops or schemas-defined."""
    global _LIBRARY
    if "torchvision" in sys.modules:
        return "already-imported"
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "not-installed"
    import torch

    native_lib = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(native_lib)
        return "native-ops"
    except (OSError, ImportError, RuntimeError):
        pass
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return "schemas-defined"


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Apply the fix just before the first ``import torchvision``, then step aside."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname == "torchvision":
            uninstall_import_hook()
            ensure_torchvision_importable()
        return None  # let the normal finders locate torchvision


def install_import_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


def uninstall_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionImportHook)]


install_import_hook()
