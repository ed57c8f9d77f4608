"""Early-exit calibration: choose ``exit_threshold`` for any lmms-eval task from one no-exit SGL run.

One SGL run without exits, made with ``record_exit_score=true`` (else the guide skips the
consistency pass that nothing in a no-exit run reads), logs per sample the guide's answer, its exit
score and the pruned large model's answer and cost. Scoring the guide's answers with the task's own
``process_results`` then lets every threshold be replayed offline, exactly as a real run at that
threshold would score and count it (same exit rule, same aggregation).

* :mod:`.runs`: read an lmms-eval output folder (results.json, samples logs, our per-sample records);
* :mod:`.scoring`: rebuild the task from its name and score the guide's answers with its own code,
  LLM judges included (cached on disk);
* :mod:`.replay`: the replay of a threshold, the threshold table, and the choice for a target;
* :mod:`.report`: console tables, JSON and plots;
* :mod:`.cli`: ``lmms-sgl-calibrate``.

May import ``lmms_sgl.method`` (the exit rule) and lmms-eval's task code; never the models.
"""


class CalibrationError(Exception):
    """Bad input or an impossible request, said in terms the user can act on."""
