"""Hatch build hook: ship a ``.pth`` file so the plain ``lmms-eval`` command gets the torchvision fix.

A ``.pth`` file at the root of site-packages runs its ``import`` line at interpreter start-up. Ours
imports ``lmms_sgl._tv_compat`` only when the ``lmms_eval`` package is installed, and the module itself
is a no-op where torchvision loads natively. Both regular and editable wheels get the file.
"""

from __future__ import annotations

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_NAME = "lmms_sgl_torchvision_compat.pth"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        build_data["force_include"][PTH_NAME] = PTH_NAME
        build_data.setdefault("force_include_editable", {})[PTH_NAME] = PTH_NAME
