"""Original-layout InternVL checkpoints -> transformers-native ones, checked against the original maths.

The tiny checkpoints come from ``lmms_sgl.factory.original`` (original names, fused tensors, two
shards); the reference forward (``tests/internvl_original_reference.py``) is written from the
original layer definitions and shares no code with the converter.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from lmms_sgl.checkpoints.integrity import CorruptCheckpointError
from lmms_sgl.checkpoints.internvl_original import convert as convert_module
from lmms_sgl.checkpoints.internvl_original.config import OriginalCheckpointError, read_original_config
from lmms_sgl.checkpoints.internvl_original.convert import (
    MARKER,
    convert_checkpoint,
    main,
    resolve_checkpoint,
)
from lmms_sgl.checkpoints.internvl_original.weights import WeightLayout, split_internlm2_wqkv
from lmms_sgl.factory.original import (
    SPECS,
    OriginalSpec,
    build_original_pair,
    build_originals,
    original_config,
)
from lmms_sgl.factory.specs import TextSpec, VisionSpec
from tests.internvl_original_reference import load_original, reference_logits

TOLERANCE = 1e-5
TILES = (2,)  # two tiles: longer than the tiny models' RoPE tables (text-only runs stay below)


@pytest.fixture(scope="session")
def originals(tmp_path_factory) -> dict[str, Path]:
    return build_originals(tmp_path_factory.mktemp("original_layout"))


@pytest.fixture(scope="session")
def converted(originals, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    return {name: convert_checkpoint(src, out / name, progress=False) for name, src in originals.items()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMMS_SGL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


def copy_original(originals: dict[str, Path], name: str, dst: Path) -> Path:
    return Path(shutil.copytree(originals[name], dst / name))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def prompt(image_token_id: int, tiles: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 400, (1, 24), generator=generator)
    text[text == image_token_id] = 7
    if tiles == 0:
        return text, None
    ids = torch.cat([text[:, :12], torch.full((1, 256 * tiles), image_token_id), text[:, 12:]], dim=1)
    return ids, torch.randn(tiles, 3, 448, 448, generator=generator)


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SPECS))
def test_converted_model_equals_original_maths(name, originals, converted):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        converted[name], dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    config, weights = load_original(originals[name])
    llm, image_token = config["llm_config"], model.config.image_token_id
    lengths = []
    for tiles in (0, *TILES):
        ids, pixels = prompt(image_token, tiles, seed=tiles)
        lengths.append(ids.shape[1])
        with torch.no_grad():
            got = model(input_ids=ids, pixel_values=pixels).logits
        want = reference_logits(config, weights, ids, pixels, image_token)
        assert (got - want).abs().max().item() <= TOLERANCE, (name, tiles)
    # both RoPE regimes are crossed: plain and dynamic NTK (InternLM2), short and long factors (Phi-3)
    threshold = llm.get("original_max_position_embeddings", llm["max_position_embeddings"])
    assert min(lengths) < threshold < max(lengths)


def test_wqkv_split_takes_query_heads_of_every_group_then_keys_then_values():
    layout = WeightLayout("internlm2", num_heads=6, num_kv_heads=2, head_dim=2, vision_hidden=4)
    # row label = 100 * group + 10 * slot + dim, slots 0-2 query heads, 3 key, 4 value
    rows = [100 * g + 10 * s + d for g in range(2) for s in range(5) for d in range(2)]
    fused = torch.tensor(rows, dtype=torch.float32)[:, None].repeat(1, 3)
    q, k, v = split_internlm2_wqkv(fused, layout)
    assert q[:, 0].tolist() == [100 * g + 10 * s + d for g in range(2) for s in range(3) for d in range(2)]
    assert k[:, 0].tolist() == [100 * g + 30 + d for g in range(2) for d in range(2)]
    assert v[:, 0].tolist() == [100 * g + 40 + d for g in range(2) for d in range(2)]


def test_configs_translate_each_variant(originals, converted):
    from transformers import AutoConfig, GenerationConfig

    guide = read_original_config(originals["internvl2-orig-guide"])
    assert (guide.text_arch, guide.num_layers, guide.template, guide.image_seq_length) == (
        "internlm2",
        2,
        "internlm2-chat",
        256,
    )
    large = AutoConfig.from_pretrained(converted["internvl2-orig-large"])
    assert large.model_type == "internvl" and large.text_config.model_type == "llama"
    assert large.text_config.rope_parameters["rope_type"] == "dynamic"
    assert large.vision_config.norm_type == "rms_norm" and large.vision_config.use_qk_norm
    assert not large.vision_config.attention_bias
    assert AutoConfig.from_pretrained(converted["internvl2-orig-qwen2"]).vision_feature_layer == -2
    phi3 = AutoConfig.from_pretrained(converted["internvl2-orig-phi3"])
    assert phi3.text_config.rope_parameters["rope_type"] == "longrope"
    for name, stop in (("internvl2-orig-guide", "<|im_end|>"), ("internvl2-orig-phi3", "<|end|>")):
        tokenizer_ids = json.loads((converted[name] / "tokenizer.json").read_text())["added_tokens"]
        stop_id = next(t["id"] for t in tokenizer_ids if t["content"] == stop)
        assert GenerationConfig.from_pretrained(converted[name]).eos_token_id == stop_id


REAL_SCALE = {
    # name: (spec with the released dimensions, parameters of the released checkpoint, in billions)
    "InternVL2-2B": (
        OriginalSpec(
            "real", "internlm2", "300m", TextSpec(2048, 24, 16, 8, 8192), VisionSpec(1024, 24, 16, 4096), 0
        ),
        2.2,
    ),
    "InternVL2-26B": (
        OriginalSpec(
            "real", "internlm2", "6b", TextSpec(6144, 48, 48, 8, 16384), VisionSpec(3200, 45, 25, 12800), 0
        ),
        25.5,
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_SCALE))
def test_released_dimensions_validate_and_size_up(name, tmp_path):
    """The paper's pair at full size, config only: accepted, and the model it builds (on the meta
    device) has the released checkpoint's parameter count."""
    from transformers import InternVLForConditionalGeneration

    spec, billions = REAL_SCALE[name]
    facts = {"vocab_size": 92553, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config = original_config(spec, facts)
    config["llm_config"]["max_position_embeddings"] = 32768
    (tmp_path / "config.json").write_text(json.dumps(config))
    original = read_original_config(tmp_path, "pretrained")
    assert original.num_layers == spec.text.num_hidden_layers
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(original.transformers_config(image_token_id=92546))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.1)


def test_pair_for_end_to_end_runs(tmp_path):
    pair = build_original_pair(tmp_path)
    assert set(pair) == {"guide", "large"}
    guide, large = (read_original_config(pair[role]) for role in ("guide", "large"))
    assert guide.image_seq_length == large.image_seq_length == 256
    assert guide.num_layers < large.num_layers


def test_streaming_writes_one_output_shard_per_source_shard(originals, tmp_path, monkeypatch):
    """Peak memory is about one shard: every write holds only the tensors of one source shard."""
    import safetensors.torch

    source = originals["internvl2-orig-large"]
    largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
    writes, real = [], safetensors.torch.save_file

    def recording(tensors, filename, metadata=None):
        writes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", recording)
    convert_checkpoint(source, tmp_path / "out", progress=False)
    assert len(writes) == len(list(source.glob("*.safetensors"))) == 2
    assert max(writes) <= largest


def test_converted_checkpoint_runs_with_its_processor(converted):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lmms_sgl.checkpoints.internvl_original.processing import load_processor

    folder = converted["internvl2-orig-guide"]
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.new("RGB", (900, 500), (200, 30, 30))], text=[text], return_tensors="pt")
    tiles = inputs["pixel_values"].shape[0]
    assert tiles > 1  # a wide image: several tiles plus the thumbnail
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 256 * tiles
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


# -- refusals, before any weights load --------------------------------------------------------
@pytest.fixture
def no_weight_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read although the checkpoint should have been refused")

    monkeypatch.setattr(convert_module, "_write_weights", fail)


def test_truncated_shard_is_refused_before_any_weights_load(originals, tmp_path, no_weight_reads):
    folder = copy_original(originals, "internvl2-orig-guide", tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["llm_config"].update(architectures=["MistralForCausalLM"]),
            r"llm_config\.architectures = \['MistralForCausalLM'\].*InternLM2ForCausalLM",
        ),
        (lambda c: c.pop("ps_version"), "lacks the field ps_version"),
        (lambda c: c["llm_config"].pop("num_hidden_layers"), "lacks the field llm_config.num_hidden_layers"),
        (lambda c: c["vision_config"].pop("norm_type"), "lacks the field vision_config.norm_type"),
        (lambda c: c.update(ps_version="v1"), r"ps_version = 'v1'.*allowed: 'v2'"),
        (lambda c: c.update(template="vicuna_v1.1"), r"template = 'vicuna_v1.1'.*internlm2-chat"),
        (
            lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
            r"llm_config\.rope_scaling.*'dynamic'",
        ),
        (lambda c: c.update(force_image_size=224), "force_image_size = 224"),
        (lambda c: c.update(use_llm_lora=16), "use_llm_lora = 16"),
    ],
)
def test_bad_config_is_refused_naming_the_field(originals, tmp_path, no_weight_reads, edit, message):
    folder = copy_original(originals, "internvl2-orig-guide", tmp_path)
    edit_config(folder, edit)
    with pytest.raises(OriginalCheckpointError, match=message):
        read_original_config(folder, "guide")
    with pytest.raises(OriginalCheckpointError, match=message):
        convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weights_that_disagree_with_the_config_are_refused(originals, tmp_path, no_weight_reads):
    folder = copy_original(originals, "internvl2-orig-guide", tmp_path)
    edit_config(folder, lambda c: c["llm_config"].update(num_key_value_heads=4))  # wqkv has 2 groups
    with pytest.raises(OriginalCheckpointError, match="wqkv"):
        convert_checkpoint(folder, tmp_path / "out", progress=False)


def test_missing_tokenizer_is_refused_before_any_weights_load(originals, tmp_path, no_weight_reads):
    folder = copy_original(originals, "internvl2-orig-phi3", tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(OriginalCheckpointError, match="tokenizer cannot be converted"):
        convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_native_checkpoints_pass_through(tmp_path, cache):
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"model_type": "internvl", "architectures": ["X"]}))
    assert read_original_config(native) is None
    assert resolve_checkpoint(str(native)) == str(native)
    assert resolve_checkpoint("org/not-in-the-hub-cache") == "org/not-in-the-hub-cache"
    assert not cache.exists()


# -- cache, determinism, command line ---------------------------------------------------------
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_converting_twice_gives_identical_files(originals, converted, tmp_path):
    again = convert_checkpoint(originals["internvl2-orig-large"], tmp_path / "again", progress=False)
    assert folder_bytes(again) == folder_bytes(converted["internvl2-orig-large"])


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    real = convert_module.convert_checkpoint

    def counting(*args, **kwargs):
        calls.append(args[1])
        time.sleep(0.2)  # widen the window in which a second process would also convert
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_checkpoint", counting)
    return calls


def test_resolve_converts_once_then_reuses(originals, cache, count_conversions):
    source = str(originals["internvl2-orig-qwen2"])
    first = resolve_checkpoint(source, "guide")
    assert Path(first).parent == cache and (Path(first) / MARKER).is_file()
    assert resolve_checkpoint(source, "guide") == first
    assert len(count_conversions) == 1


def test_concurrent_resolves_convert_once(originals, cache, count_conversions):
    source, results = str(originals["internvl2-orig-phi3"]), []
    threads = [threading.Thread(target=lambda: results.append(resolve_checkpoint(source))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert len(count_conversions) == 1


def test_failed_or_crashed_conversion_is_never_used(originals, cache, monkeypatch):
    source = str(originals["internvl2-orig-llama"])

    def crash(*args, **kwargs):
        raise RuntimeError("simulated failure after the weights were written")

    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "_write_companions", crash)
        with pytest.raises(RuntimeError, match="simulated failure"):
            resolve_checkpoint(source)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    # a hard crash (no cleanup) leaves a partial folder and maybe an unfinished target
    target = Path(resolve_checkpoint(source))
    shutil.rmtree(target)
    target.mkdir()
    (target / "config.json").write_text("{}")
    partial = cache / f".{target.name}.partial-12345"
    partial.mkdir()
    assert Path(resolve_checkpoint(source)) == target
    assert (target / MARKER).is_file() and not partial.exists()


def test_hub_id_resolves_from_the_hub_cache(originals, cache, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--OpenGVLab--InternVL2-tiny"
    commit = "0" * 40
    shutil.copytree(originals["internvl2-orig-guide"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert read_original_config("OpenGVLab/InternVL2-tiny").num_layers == 2
    resolved = Path(resolve_checkpoint("OpenGVLab/InternVL2-tiny"))
    assert resolved.name.startswith("InternVL2-tiny-") and (resolved / MARKER).is_file()


def test_command_line_converts(originals, converted, tmp_path):
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'lmms-sgl-convert = "lmms_sgl.checkpoints.internvl_original.convert:main"' in pyproject
    main([str(originals["internvl2-orig-guide"]), str(tmp_path / "cli")])
    assert folder_bytes(tmp_path / "cli") == folder_bytes(converted["internvl2-orig-guide"])
    with pytest.raises(FileExistsError, match="not an empty folder"):
        main([str(originals["internvl2-orig-guide"]), str(tmp_path / "cli")])


# -- destinations, concurrent and interrupted conversions, arguments ---------------------------
def test_max_tiles_below_one_is_an_argument_error_before_any_work(originals, tmp_path, monkeypatch, capsys):
    def planned(*args, **kwargs):
        raise AssertionError("the checkpoint was planned although an argument is invalid")

    monkeypatch.setattr(convert_module, "plan_conversion", planned)
    source = str(originals["internvl2-orig-guide"])
    with pytest.raises(SystemExit) as exit_info:
        main([source, str(tmp_path / "out"), "--max-tiles", "0"])
    assert exit_info.value.code == 2
    assert (
        "argument --max-tiles: '0': the tiling limit must be a whole number >= 1" in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match=r"max_tiles=0: the tiling limit must be a whole number >= 1"):
        convert_checkpoint(source, tmp_path / "out", max_tiles=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_destination_below_a_regular_file_is_refused_clearly(originals, tmp_path, no_weight_reads):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    dst = tmp_path / "notes.txt" / "converted"
    with pytest.raises(NotADirectoryError, match=r"notes\.txt', which is a file, not a folder"):
        convert_checkpoint(originals["internvl2-orig-guide"], dst, progress=False)


def test_killed_conversions_leave_nothing_the_next_one_keeps(originals, tmp_path):
    """A ``.DST.partial-PID`` folder of a process that no longer runs is removed by the next
    conversion into DST; one of a running process is left alone."""
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a PID that has exited
    assert dead.wait() == 0
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a shard")
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    convert_checkpoint(originals["internvl2-orig-guide"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / MARKER).is_file()
    assert not stale.exists() and live.exists()


def test_two_conversions_into_one_destination_refuse_early(originals, tmp_path, monkeypatch):
    """The second conversion into the same folder is refused before it reads any weights, while
    the first one finishes normally."""
    real_write, started, proceed, calls = (
        convert_module._write_weights,
        threading.Event(),
        threading.Event(),
        [],
    )

    def first_waits(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            started.set()
            assert proceed.wait(60)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_write_weights", first_waits)
    source, dst, outcome = originals["internvl2-orig-guide"], tmp_path / "out", {}

    def first():
        try:
            outcome["first"] = convert_checkpoint(source, dst, progress=False)
        except BaseException as error:  # reported by the assertion below
            outcome["first"] = error

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(RuntimeError, match=r"another conversion is writing into it") as refused:
            convert_checkpoint(source, dst, progress=False)
        assert type(refused.value).__name__ == "ConversionLockedError"
    finally:
        proceed.set()
        thread.join(120)
    assert outcome["first"] == dst and (dst / MARKER).is_file()
    assert calls == ["first"], "the second conversion read no weights"
