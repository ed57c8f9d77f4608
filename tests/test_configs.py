"""Every preset in configs/ is a valid lmms-eval config with valid SGL model arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmms_sgl.lmms.args import parse_model_args

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path, monkeypatch):
    from lmms_eval.__main__ import parse_eval_args
    from lmms_eval.utils import simple_parse_args_string

    monkeypatch.setattr("sys.argv", ["lmms-eval"])  # the parser reads sys.argv
    parser, _ = parse_eval_args()
    valid = {action.dest for action in parser._actions}
    runs = yaml.safe_load(path.read_text())
    runs = runs if isinstance(runs, list) else [runs]
    assert runs
    for run in runs:
        assert set(run) <= valid, sorted(set(run) - valid)
        assert run["model"] in ("sgl_internvl2", "sgl_llava", "sgl_qwen2_vl")
        parse_model_args(**simple_parse_args_string(run["model_args"]), batch_size=run.get("batch_size", 1))


def test_there_are_presets():
    assert {p.name for p in CONFIGS} >= {"demo.yaml"}
