"""Entry point of the ``lmms_eval.models`` group: lazy manifests, nothing heavy imported.

lmms-eval imports this on ``import lmms_eval.models`` in every process, before it parses its
command line and before it creates its W&B run. Under ``accelerate launch`` lmms-eval would create
one W&B run per process (only rank 0 ever gets metrics), so on ranks other than 0 this hook drops
``--wandb_args``/``--wandb_log_samples`` from the command line: exactly one run per launch. Online
W&B with no key or no reachable server falls back to offline here (``lmms_sgl.lmms.wandb_check``).
"""

from __future__ import annotations

import os
import sys

MODELS = {  # the simple interface (doc_to_visual + text; log-likelihood / multiple choice)
    "sgl_internvl2": "lmms_sgl.lmms.sgl_internvl2.SGLInternVL2",
    "sgl_llava": "lmms_sgl.lmms.sgl_llava.SGLLlava",
    "sgl_qwen2_vl": "lmms_sgl.lmms.sgl_qwen2_vl.SGLQwen2VL",
}
CHAT_MODELS = {name: f"{path}Chat" for name, path in MODELS.items()}  # what a plain --model resolves to
_WANDB_FLAGS_WITH_VALUE = ("--wandb_args",)
_WANDB_FLAGS = ("--wandb_log_samples",)


def strip_wandb_flags(argv: list[str]) -> list[str]:
    """``argv`` without lmms-eval's W&B options (both ``--flag value`` and ``--flag=value``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _WANDB_FLAGS_WITH_VALUE:
            skip = "=" not in arg
            continue
        if name in _WANDB_FLAGS:
            continue
        kept.append(arg)
    return kept


def keep_wandb_on_rank_zero() -> None:
    rank = os.environ.get("RANK")
    if rank is not None and rank != "0":
        sys.argv[:] = strip_wandb_flags(sys.argv)


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    from lmms_sgl.lmms.wandb_check import fall_back_to_offline

    keep_wandb_on_rank_zero()
    fall_back_to_offline(sys.argv)  # before lmms-eval's wandb.init, which hangs with no server
    return [
        ModelManifest(model_id=name, simple_class_path=path, chat_class_path=CHAT_MODELS[name])
        for name, path in MODELS.items()
    ]
