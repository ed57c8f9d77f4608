"""``lmms-sgl-sweep``: the paper's table on any lmms-eval task, resumable.

* :mod:`.grid`: named grids and grid YAML files, expanded into points and validated (the models' own
  argument checks, the method registry, the checkpoints' configs) before any model loads;
* :mod:`.run`: each point is one stock lmms-eval evaluation (``simple_evaluate``, samples logged),
  cached on disk by its full arguments and the checkpoints' identity; exit thresholds are replayed
  from the no-exit SGL point's records by :mod:`lmms_sgl.calibration`;
* :mod:`.report`: rows per task, paired differences against SGL, the frontier, Markdown, JSON, plots;
* :mod:`.cli`: the command.

May import every lower package (method, reporting, costs, calibration, lmms), never the proving
ground: the proving study is built on it.
"""


class SweepError(Exception):
    """Bad input, said in terms the user can act on (naming the point and the valid values)."""
