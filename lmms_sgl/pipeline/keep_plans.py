"""Which visual tokens the large model keeps: the configured method's keep plan, armed on its pruner.

The method (:mod:`lmms_sgl.method.registry`: SGL's own in :mod:`lmms_sgl.method.sgl`, the baselines
in :mod:`lmms_sgl.baselines`) builds its pruner once and arms it per batch; this planner gives it the
batch and, where the plan at layer 0 is known before the vision tower runs, lets the vision tower
encode only the units kept tokens read (:mod:`.vision_units`).

After a run, :meth:`KeepPlanner.stages` and :meth:`KeepPlanner.selection_flops` say what each
sample's layers saw and what choosing its tokens cost (for ``pipeline.accounting``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method.registry import MethodRun, PlanBatch, method_named
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import vision_units


class KeepPlanner:
    """The large model's pruner and the keep plan of the configured method."""

    def __init__(self, large: LoadedVLM, settings: SGLSettings):
        self.large, self.settings = large, settings
        self.method = method_named(settings.method)
        self.layer_k = settings.layer_k(large.num_layers) if self.method.prunes else None
        self.pruner = self.method.make_pruner(large, settings, self.layer_k) if self.method.prunes else None
        self.skips_units = self.method.prunes and settings.skips_units(large.num_layers)
        self.unit_use: list[vision_units.UnitUse | None] | None = None  # of the last pruned batch
        self._run: MethodRun | None = None
        self._stages: list[list[tuple[int, int]]] = []

    @contextmanager
    def pruned(self, samples, records, inputs, visual, scores, query_rows=None) -> Iterator:
        """The large model with this method's keep plan armed (and the recorder or tap it reads
        active). ``query_rows`` (``[B, P]`` bool, one row each) overrides FastV's and PDrop's query
        (default: the last prompt token). With unit skipping, the vision tower encodes only the units
        the plan at layer 0 needs (``unit_use``)."""
        self.unit_use = None
        units = None
        if self.skips_units or self.settings.keep_units is not None:
            units = self.large.family.visual_units(self.large, inputs, [s.prompt for s in samples])
        batch = PlanBatch(
            self.large,
            self.settings,
            self.layer_k,
            self.pruner,
            samples,
            records,
            inputs,
            visual,
            scores,
            query_rows,
            units,
        )
        with ExitStack() as stack:
            run = self.method.arm(batch, stack)
            if self.skips_units and run.first_plan is not None:
                hooks, self.unit_use = vision_units.skipping(
                    self.large, units, run.first_plan, visual, records
                )
                stack.enter_context(hooks)
            yield self.pruner
            self._run, self._stages = run, run.read_stages()

    def stages(self, sample: int) -> list[tuple[int, int]]:
        """``[(layer, kept visual tokens), ...]`` of ``sample`` in the last pruned run."""
        return self._stages[sample]

    def selection_flops(self, sample: int, prompt: int, n_visual: int) -> float:
        """What choosing ``sample``'s tokens cost beyond the forward itself (the method's count)."""
        return self._run.selection_flops(sample, prompt, n_visual, self.stages(sample))
