"""Convert an original-layout InternVL checkpoint into a transformers-native folder, once.

``convert_checkpoint(src, dst)`` checks everything it can before writing a byte: the config
(:mod:`.config`), every source shard's safetensors header (a truncated download is caught here),
and the complete tensor plan (names and shapes, computed on meta tensors) against the transformers
model it must load into. It then streams one source shard at a time into one output shard, so peak
memory is about one shard, never the model twice. Output goes to a temporary sibling folder that is
renamed into place only when complete: a crashed conversion never leaves a folder that looks usable.
Two conversions of the same source are byte-identical.

``resolve_checkpoint(path_or_hub_id)`` is what model loading calls: non-original checkpoints pass
through unchanged; original ones are converted on first use into a cache folder
(``$LMMS_SGL_CACHE/converted/<name>-<hash>``, default ``~/.cache/lmms_sgl``) under a file lock, so
in a multi-process launch one process converts and the others wait and reuse it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from lmms_sgl.checkpoints.integrity import check_weights, safetensors_header
from lmms_sgl.checkpoints.internvl_original.config import (
    OriginalCheckpointError,
    OriginalInternVL,
    read_original_config,
)
from lmms_sgl.checkpoints.internvl_original.weights import (
    TEXT,
    UnconvertibleTensorError,
    WeightLayout,
    convert_tensor,
    tied_lm_head,
)

CONVERTER_VERSION = 1
MARKER = "lmms_sgl_conversion.json"
DEFAULT_MAX_TILES = 6  # the paper's and lmms-eval's internvl2 setting
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass
class ShardPlan:
    """One source shard and the transformers tensors it becomes."""

    source: Path
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    source_tensors: int = 0
    copy_lm_head: bool = False  # tied embeddings: write lm_head as a copy of embed_tokens


@dataclass
class ConversionPlan:
    original: OriginalInternVL
    folder: Path
    shards: list[ShardPlan]
    dtype: torch.dtype

    @property
    def tensor_count(self) -> int:
        return sum(s.source_tensors for s in self.shards)


# -- sources ----------------------------------------------------------------------------------
def source_folder(path_or_hub_id: str | Path) -> Path:
    """A local folder as is; a hub id through ``snapshot_download`` (offline: from the hub cache)."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=_HUB_FILES))
    except Exception as error:  # the hub raises many types; name the source either way
        raise OriginalCheckpointError(
            f"{str(path_or_hub_id)!r} is neither a local folder nor a downloadable hub snapshot "
            f"(with HF_HUB_OFFLINE=1 it must be in the hub cache): {error}"
        ) from error


def weight_files(folder: Path, argument: str) -> list[Path]:
    """The checkpoint's safetensors shards in index order; pickled ``.bin`` weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(names))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise OriginalCheckpointError(
        f"{argument}={str(folder)!r}: no model.safetensors or model.safetensors.index.json; only "
        "safetensors weights are converted (pickled .bin files would run code to load)"
    )


# -- planning ---------------------------------------------------------------------------------
def plan_conversion(folder: Path, original: OriginalInternVL) -> ConversionPlan:
    """Every output tensor's name, shape and dtype, from headers alone; refuses any mismatch."""
    argument = original.argument
    check_weights(folder, argument)
    layout = WeightLayout.from_original(original)
    shards, seen, dtypes = [], {}, set()
    for file in weight_files(folder, argument):
        shard = ShardPlan(file)
        for name, info in sorted(safetensors_header(file).items()):
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise OriginalCheckpointError(
                    f"{argument}={original.source!r}: {file.name}:{name} has dtype {info['dtype']}; "
                    f"allowed: {sorted(_DTYPES)}"
                )
            dtype = _DTYPES[info["dtype"]]
            dtypes.add(dtype)
            shard.source_tensors += 1
            meta = torch.empty(info["shape"], dtype=dtype, device="meta")
            try:
                converted = convert_tensor(name, meta, layout)
            except UnconvertibleTensorError as error:
                hint = (
                    " (an unmerged LoRA adapter: merge it into the weights first)" if "lora" in name else ""
                )
                raise OriginalCheckpointError(
                    f"{argument}={original.source!r}: {file.name}: {error}{hint}"
                ) from None
            for target, tensor in converted.items():
                if target in seen:
                    raise OriginalCheckpointError(
                        f"{argument}={original.source!r}: {name} maps to {target}, "
                        f"which {seen[target]} already gives"
                    )
                seen[target] = name
                shard.outputs[target] = (tuple(tensor.shape), tensor.dtype)
        shards.append(shard)
    if tied_lm_head(set(seen)):
        if not original.llm.get("tie_word_embeddings", False):
            raise OriginalCheckpointError(
                f"{argument}={original.source!r}: the checkpoint has no output layer (lm_head) and "
                "llm_config.tie_word_embeddings is not true"
            )
        for shard in shards:
            if TEXT + "embed_tokens.weight" in shard.outputs:
                shard.copy_lm_head = True
                seen["lm_head.weight"] = "tied embeddings"
    # the widest floating dtype present (ties broken by name, so the choice is deterministic)
    dtype = max(dtypes, key=lambda d: (torch.finfo(d).bits, str(d)))
    plan = ConversionPlan(original, folder, shards, dtype)
    _check_against_model(plan)
    return plan


def _check_against_model(plan: ConversionPlan) -> None:
    """The planned tensors must be exactly the transformers model's state dict (names and shapes)."""
    from transformers import InternVLForConditionalGeneration

    config = plan.original.transformers_config(image_token_id=0)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    planned = {}
    for shard in plan.shards:
        planned.update({name: shape for name, (shape, _) in shard.outputs.items()})
        if shard.copy_lm_head:
            planned["lm_head.weight"] = shard.outputs[TEXT + "embed_tokens.weight"][0]
    source = f"{plan.original.argument}={plan.original.source!r}"
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    if missing or extra:
        raise OriginalCheckpointError(
            f"{source}: its weights do not match its config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    wrong = [(n, planned[n], expected[n]) for n in sorted(expected) if planned[n] != expected[n]]
    if wrong:
        name, got, want = wrong[0]
        raise OriginalCheckpointError(
            f"{source}: {len(wrong)} tensor(s) disagree with config.json, e.g. {name} has shape {got}, "
            f"the config implies {want}"
        )


# -- writing ----------------------------------------------------------------------------------
def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_weights(plan: ConversionPlan, out: Path, progress: bool) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    layout = WeightLayout.from_original(plan.original)
    shards = [s for s in plan.shards if s.outputs]
    weight_map, total = {}, 0
    with tqdm(total=plan.tensor_count, desc="converting", unit="tensor", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(shard.source), framework="pt") as handle:
                for name in sorted(handle.keys()):
                    tensors.update(convert_tensor(name, handle.get_tensor(name), layout))
                    bar.update(1)
            if shard.copy_lm_head:
                tensors["lm_head.weight"] = tensors[TEXT + "embed_tokens.weight"].clone()
            file = _shard_name(i, len(shards))
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(out / file), metadata={"format": "pt"}
            )
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            logger.info(f"wrote {file}: {len(tensors)} tensors from {shard.source.name}")
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@dataclass
class Companions:
    """Everything besides the weights, prepared (and checked) before any weights are written."""

    config: object  # InternVLConfig
    generation: object  # GenerationConfig
    processor: object  # InternVLProcessor
    marker: dict


def prepare_companions(plan: ConversionPlan, max_tiles: int) -> Companions:
    """Tokenizer, processor, configs: cheap, and refused here rather than after the weights."""
    from transformers import GenerationConfig

    from lmms_sgl.checkpoints.internvl_original.processing import build_processor, stop_token_ids

    original = plan.original
    where = f"{original.argument}={original.source!r}"
    try:
        processor = build_processor(plan.folder, original.raw, max_tiles=max_tiles)
        stop_ids = stop_token_ids(processor.tokenizer, original.template)
    except (OSError, ValueError) as error:
        raise OriginalCheckpointError(f"{where}: its tokenizer cannot be converted: {error}") from error
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    vocab = int(original.llm["vocab_size"])
    if image_token_id is None or image_token_id == tokenizer.unk_token_id or image_token_id >= vocab:
        raise OriginalCheckpointError(
            f"{where}: the tokenizer has no usable <IMG_CONTEXT> token "
            f"(id {image_token_id}, vocab_size {vocab})"
        )
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab:
        raise OriginalCheckpointError(
            f"{where}: the tokenizer has token id {largest} but llm_config.vocab_size is {vocab}"
        )
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
    )
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source": original.source,
        "source_files": [s.source.name for s in plan.shards],
        "text_arch": original.text_arch,
        "template": original.template,
        "max_tiles": max_tiles,
        "stop_token_ids": stop_ids,
    }
    config = original.transformers_config(image_token_id, dtype=str(plan.dtype).removeprefix("torch."))
    return Companions(config, generation, processor, marker)


def _write_companions(companions: Companions, out: Path) -> None:
    """Configs and processor; the marker last, as the sign of a finished conversion."""
    companions.config.to_json_file(str(out / "config.json"))
    companions.generation.to_json_file(str(out / "generation_config.json"))
    companions.processor.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps(companions.marker, indent=2, sort_keys=True) + "\n")


class ConversionLockedError(RuntimeError):
    """Another conversion is writing into the same destination."""


def check_max_tiles(max_tiles: object, name: str = "max_tiles") -> int:
    """``max_tiles`` must be a whole number >= 1 (the processor's tiling limit)."""
    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
        raise ValueError(f"{name}={max_tiles!r}: the tiling limit must be a whole number >= 1 (default 6)")
    return max_tiles


def check_destination(dst: Path) -> None:
    """``dst`` must be new or an empty folder, and lie below folders (not below a regular file)."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"dst={str(dst)!r} exists and is not an empty folder; choose a new folder")
    for ancestor in dst.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(
                    f"dst={str(dst)!r} lies below {str(ancestor)!r}, which is a file, not a folder; "
                    "choose a destination inside a folder"
                )
            return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(dst: Path) -> None:
    """Remove ``.DST.partial-PID`` folders left by killed conversions into ``dst`` (their PID is no
    longer running); a live one is left alone and named."""
    for partial in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if not pid.isdigit():  # not a name we write
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            logger.warning(f"{partial} belongs to running process {pid}; left in place")
            continue
        logger.warning(f"removing {partial}, left by an interrupted conversion")
        shutil.rmtree(partial)


@contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Hold ``.DST.lock`` next to ``dst`` while converting into it; refuse at once if another
    conversion holds it (rather than converting everything and then colliding)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(dst.parent / f".{dst.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConversionLockedError(
            f"dst={str(dst)!r}: another conversion is writing into it (it holds {lock.lock_file}); "
            "wait for it to finish or choose another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    argument: str = "src",
    max_tiles: int = DEFAULT_MAX_TILES,
    progress: bool = True,
) -> Path:
    """Convert ``src`` (folder or hub id of the original layout) into the new folder ``dst``.

    Everything is validated before anything is written; ``dst`` appears only when complete. One
    conversion at a time per destination (a lock file beside it, taken before any weights are
    read); the hidden ``.DST.partial-PID`` folder a killed conversion leaves is removed by the next
    conversion into ``dst``.
    """
    dst = Path(dst)
    check_max_tiles(max_tiles)
    check_destination(dst)
    folder = source_folder(src)
    original = read_original_config(folder, argument)
    if original is None:
        raise OriginalCheckpointError(
            f"{argument}={str(src)!r} is not an original-layout InternVL checkpoint (config.json needs "
            "architectures ['InternVLChatModel']); transformers-native checkpoints need no conversion"
        )
    original = OriginalInternVL(source=str(src), argument=argument, raw=original.raw)
    plan = plan_conversion(folder, original)
    companions = prepare_companions(plan, max_tiles)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(dst):
        check_destination(dst)  # again: another conversion may have finished meanwhile
        remove_stale_partials(dst)
        partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        logger.info(
            f"converting {original.describe()} from {folder} ({len(plan.shards)} shard(s)) -> {dst}, "
            f"writing into {partial} until complete (if this process is killed, the next conversion "
            f"into {dst} removes it)"
        )
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        try:
            _write_weights(plan, partial, progress)
            _write_companions(companions, partial)
            if dst.exists():
                dst.rmdir()  # checked empty above
            os.replace(partial, dst)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    logger.info(f"converted {original.source} -> {dst}")
    return dst


# -- cache ------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("LMMS_SGL_CACHE") or Path.home() / ".cache" / "lmms_sgl") / "converted"


def source_identity(folder: Path) -> str:
    """A short hash of what the conversion depends on: the files (name, size, mtime), the converter."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    facts = {
        "folder": str(folder.resolve()),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "converter_version": CONVERTER_VERSION,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cache_target(folder: Path, original: OriginalInternVL) -> Path:
    """The conversion cache folder of an original checkpoint's local ``folder``."""
    return cache_root() / f"{original.name.replace('/', '--')}-{source_identity(folder)}"


def check_original(path_or_hub_id: str | Path, original: OriginalInternVL) -> None:
    """What a conversion checks before writing, without converting: shard headers, every tensor's
    name and shape against ``config.json`` (unmerged LoRA tensors included) and the tokenizer.

    Cheap (headers and meta tensors), so a run checks guide and large model this way before loading
    either; skipped when the cache already holds the finished conversion.
    """
    folder = source_folder(path_or_hub_id)
    if (cache_target(folder, original) / MARKER).is_file():
        return
    prepare_companions(plan_conversion(folder, original), DEFAULT_MAX_TILES)


def resolve_checkpoint(path_or_hub_id: str | Path, argument: str = "pretrained") -> str:
    """What to load for ``path_or_hub_id``: itself, or the converted cache folder of an original one.

    The cached processor tiles into at most 6 tiles by default; callers that want another limit pass
    it per call (``max_patches``), so one conversion serves every setting.
    """
    original = read_original_config(path_or_hub_id, argument)
    if original is None:
        return str(path_or_hub_id)
    folder = source_folder(path_or_hub_id)
    target = cache_target(folder, original)
    if (target / MARKER).is_file():
        logger.info(f"{argument}={str(path_or_hub_id)!r}: using the converted checkpoint {target}")
        return str(target)
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock, who = FileLock(str(target) + ".lock"), f"{argument}={str(path_or_hub_id)!r} (pid {os.getpid()})"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info(f"{who}: another process is converting it into {target}; waiting")
        lock.acquire()
    try:
        if (target / MARKER).is_file():
            logger.info(f"{who}: another process converted it; using {target}")
            return str(target)
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            logger.warning(f"removing {stale}, left by an interrupted conversion")
            shutil.rmtree(stale)
        if target.exists():
            logger.warning(f"removing {target}: it lacks {MARKER}, so it is not a finished conversion")
            shutil.rmtree(target)
        logger.info(f"{who}: this process converts it (first use) -> {target}")
        convert_checkpoint(folder, target, argument=argument)
    finally:
        lock.release()
    return str(target)


# -- command line -----------------------------------------------------------------------------
def _max_tiles_argument(value: str) -> int:
    try:
        return check_max_tiles(int(value), "--max-tiles")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the tiling limit must be a whole number >= 1") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lmms-sgl-convert",
        description="Convert an original-layout InternVL checkpoint (InternVLChatModel) into a "
        "transformers-native InternVLForConditionalGeneration folder, without running its code.",
    )
    parser.add_argument(
        "src", help="original checkpoint: a local folder or a hub id (hub cache when offline)"
    )
    parser.add_argument("dst", type=Path, help="new folder that receives the converted checkpoint")
    parser.add_argument(
        "--max-tiles",
        type=_max_tiles_argument,
        default=DEFAULT_MAX_TILES,
        help="processor's tiling limit (default 6)",
    )
    args = parser.parse_args(argv)
    convert_checkpoint(args.src, args.dst, argument="src", max_tiles=args.max_tiles)


if __name__ == "__main__":
    main()
