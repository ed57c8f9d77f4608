"""The README and docs/ cannot drift from the code: every relative link resolves (file and heading),
every ``lmms-eval`` example passes lmms-eval's own flag parser and the SGL models' argument checks
(without loading a model), and every ``lmms-sgl-*`` / ``python -m lmms_sgl...`` example parses with
its command's own parser. Examples are read from fenced code blocks; a line may continue with ``\\``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SEPARATORS = {"&&", "||", ";", "|", "&"}
SHELL = {"bash", "sh", "shell", "console"}  # the languages of fenced blocks that hold commands


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# -- markdown ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the block's first content line
    language: str
    lines: tuple[str, ...]


def split_fences(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced code blocks of a page, and its other lines (numbered from 1)."""
    blocks, prose, current, start, language = [], [], None, 0, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current, start, language = [], number + 1, line.strip()[3:].strip()
            else:
                blocks.append(Block(path, start, language, tuple(current)))
                current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append((number, line))
    assert current is None, f"{where(path, start - 1)}: unclosed code fence"
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lowercased, punctuation other than hyphens
    and spaces removed (underscores are word characters and stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, duplicates numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in split_fences(path)[1]:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(path: Path) -> list[tuple[int, str]]:
    """Relative link targets outside code (inline code spans removed first)."""
    found = []
    for number, line in split_fences(path)[1]:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                found.append((number, target))
    return found


def check_link(path: Path, target: str) -> str | None:
    """None when ``target`` (relative to ``path``) exists and its anchor is a heading there."""
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    if not resolved.exists():
        return f"{resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} does not exist"
    if anchor:
        if resolved.suffix != ".md":
            return f"anchor #{anchor} into {resolved.name}, which is no markdown page"
        if anchor not in anchors(resolved):
            return f"no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}"
    return None


# -- commands in code blocks ------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    text: str  # the logical command line, continuations joined
    argv: tuple[str, ...]  # the command's own arguments
    program: str  # "lmms-eval", a console script name, or "python -m <module>"

    def __str__(self) -> str:
        return f"{where(self.path, self.line)}: {self.text!r}"


def logical_lines(block: Block):
    """(line number, command) with ``\\`` continuations joined."""
    pending, first = [], 0
    for offset, line in enumerate(block.lines):
        if not pending:
            first = block.line + offset
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        yield first, " ".join(part.strip() for part in pending)
        pending = []
    if pending:
        yield first, " ".join(part.strip() for part in pending)


def tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def commands(words: list[str]):
    """The simple commands of a shell line (split at &&, ;, | ...)."""
    current = []
    for word in words:
        if word in SEPARATORS:
            if current:
                yield current
            current = []
        else:
            current.append(word)
    if current:
        yield current


def program_of(words: list[str]) -> tuple[str, list[str]] | None:
    """Which of our programs a command runs, and its arguments: ``lmms-eval`` (also as
    ``[accelerate launch ...] -m lmms_eval``), a console script of pyproject.toml, or
    ``python -m lmms_sgl...``."""
    for index, word in enumerate(words):
        name = word.rsplit("/", 1)[-1]
        if name == "lmms-eval" or name in SCRIPTS:
            return name, words[index + 1 :]
        if word == "-m" and index + 1 < len(words):
            module = words[index + 1]
            if module == "lmms_eval":
                return "lmms-eval", words[index + 2 :]
            if module.startswith("lmms_sgl"):
                return f"python -m {module}", words[index + 2 :]
    return None


def examples() -> list[Example]:
    found = []
    for path in PAGES:
        for block in split_fences(path)[0]:
            if block.language not in SHELL:  # e.g. the package map
                continue
            for number, text in logical_lines(block):
                if not text or text.lstrip().startswith("#"):
                    continue
                try:
                    words = tokens(text)
                except ValueError as error:  # unbalanced quotes: worth failing on too
                    found.append(Example(path, number, text, (str(error),), "unparsable shell"))
                    continue
                for command in commands(words):
                    program = program_of(command)
                    if program is not None:
                        found.append(Example(path, number, text, tuple(program[1]), program[0]))
    return found


EXAMPLES = examples()
LMMS_EVAL = [e for e in EXAMPLES if e.program == "lmms-eval"]
OUR_COMMANDS = [e for e in EXAMPLES if e.program != "lmms-eval"]


def ids(items) -> list[str]:
    return [f"{e.path.relative_to(ROOT)}:{e.line}" for e in items]


# -- what runs before a model loads -------------------------------------------------------------------
def lmms_eval_parser(monkeypatch) -> argparse.ArgumentParser:
    from lmms_eval.__main__ import parse_eval_args

    monkeypatch.setattr("sys.argv", ["lmms-eval"])  # it parses sys.argv after building the parser
    return parse_eval_args()[0]


def parse_or_fail(parser_call, example: Example):
    """Run ``parser_call``; an argparse refusal (SystemExit) fails naming the file, line and example."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser_call()
    except SystemExit as error:
        message = stderr.getvalue().strip().splitlines()[-1:] or [f"exit status {error.code}"]
        pytest.fail(f"{example}: {example.program} refuses its arguments: {message[0]}")


def check_model_args(model: str, arg_string: str, from_command_line: dict) -> None:
    """What an SGL model checks of its ``--model_args`` before it reads any checkpoint file
    (``SGLModel.create_from_arg_string`` and ``__init__`` up to ``check_checkpoint``): no argument
    twice, lmms-eval's parsing of the string, ``parse_model_args``, the family's own arguments and the
    guide's layout. ``pretrained=`` / ``guide=`` paths and hub ids are not looked up."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_sgl.lmms.args import parse_model_args, reject_repeated_arguments
    from lmms_sgl.lmms.registry import MODELS

    if model not in MODELS:
        raise ValueError(f"--model {model} is not one of {sorted(MODELS)}")
    reject_repeated_arguments(arg_string)
    kwargs = simple_parse_args_string(arg_string)
    both = sorted(set(kwargs) & set(from_command_line))
    if both:
        raise ValueError(f"{both} given in --model_args and on lmms-eval's command line")
    module, _, name = MODELS[model].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    instance = cls.__new__(cls)  # __init__ would read the checkpoints and load them
    instance.args = parse_model_args(**kwargs, **from_command_line)
    instance.make_family().for_guide(**instance.args.guide_layout)


def sgl_runs(namespace: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(model, model_args, command-line extras) of every SGL run an lmms-eval example starts."""
    extras = {"batch_size": namespace.batch_size, "max_batch_size": namespace.max_batch_size}
    extras["device"] = namespace.device
    runs = []
    if namespace.config:
        config = yaml.safe_load((ROOT / namespace.config).read_text())
        for run in config if isinstance(config, list) else [config]:
            merged = {**extras, **{k: v for k, v in run.items() if k in extras}}
            runs.append((run.get("model"), run.get("model_args", ""), merged))
    else:
        runs.append((namespace.model, namespace.model_args or "", extras))
    return [
        (model, args, {k: v for k, v in extra.items() if v is not None})
        for model, args, extra in runs
        if str(model).startswith("sgl_")
    ]


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = [
        f"{where(path, number)}: [{target}]: {problem}"
        for number, target in links(path)
        if (problem := check_link(path, target)) is not None
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("example", LMMS_EVAL, ids=ids(LMMS_EVAL))
def test_lmms_eval_example_passes_the_argument_checks(example, monkeypatch):
    parser = lmms_eval_parser(monkeypatch)
    namespace = parse_or_fail(lambda: parser.parse_args(list(example.argv)), example)
    if namespace.config and not (ROOT / namespace.config).is_file():
        pytest.fail(f"{example}: --config {namespace.config} does not exist")
    runs = sgl_runs(namespace)
    if namespace.model == "hf" and not namespace.config:
        pytest.fail(f"{example}: no --model and no --config (lmms-eval would run its default 'hf')")
    for model, arg_string, extras in runs:
        try:
            check_model_args(model, arg_string, extras)
        except (ValueError, TypeError) as error:
            pytest.fail(f"{example}: --model {model} --model_args refused: {error}")


class _Parsed(Exception):
    """Raised right after the command's parser accepted its arguments: nothing else runs."""


def parse_only(main, argv: list[str]) -> argparse.Namespace:
    """Call the command's ``main(argv)`` but stop as soon as its parser's ``parse_args`` returns."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
    raise AssertionError(f"{main.__module__}.main returned without parsing its arguments")


def main_of(program: str):
    if program.startswith("python -m "):
        module = importlib.import_module(program.removeprefix("python -m "))
        assert hasattr(module, "main"), f"{program}: the module has no main()"
        return module.main
    module, _, name = SCRIPTS[program].partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("example", OUR_COMMANDS, ids=ids(OUR_COMMANDS))
def test_command_example_parses_with_its_parser(example):
    if example.program == "unparsable shell":
        pytest.fail(f"{example}: {example.argv[0]}")
    main = main_of(example.program)
    assert "argv" in inspect.signature(main).parameters, f"{example}: main() takes no argv"
    parse_or_fail(lambda: parse_only(main, list(example.argv)), example)


def test_examples_are_found():
    """The collection itself works: the README's own examples of each kind are among them."""
    readme = {(e.program, e.path.name) for e in EXAMPLES if e.path.name == "README.md"}
    assert ("lmms-eval", "README.md") in readme
    assert ("lmms-sgl-convert", "README.md") in readme
    assert {e.program for e in OUR_COMMANDS} >= {"lmms-sgl-cost", "lmms-sgl-calibrate", "lmms-sgl-sweep"}
    assert any("accelerate" in e.text for e in LMMS_EVAL)
    assert any("--config" in e.argv for e in LMMS_EVAL)


# -- the argument tables ----------------------------------------------------------------------------
def table_arguments(path: Path) -> dict[str, str]:
    """``| `name` | default | meaning |`` rows of the argument tables of a page, by argument name."""
    rows = {}
    for _, line in split_fences(path)[1]:
        match = re.match(r"\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", line)
        if match and line.count(" | ") >= 2:
            for name in filter(None, match.groups()):
                rows[name] = line
    return rows


def test_every_model_argument_is_documented_and_every_documented_one_exists():
    from lmms_sgl.lmms.args import parse_model_args

    accepted = set(inspect.signature(parse_model_args).parameters) - {"unknown"}
    from_lmms_eval = {"batch_size", "max_batch_size"}  # lmms-eval's --batch_size, not --model_args
    full = ROOT / "docs" / "arguments.md"
    documented = set(table_arguments(full))
    assert documented - accepted == set(), f"{full.name} documents arguments that do not exist"
    assert accepted - from_lmms_eval - documented == set(), f"{full.name} lacks arguments"


def test_readme_argument_rows_equal_the_full_table():
    """The README's first ten arguments are copies of rows of docs/arguments.md, so they cannot drift."""
    readme, full = table_arguments(ROOT / "README.md"), table_arguments(ROOT / "docs" / "arguments.md")
    assert len(readme) == 10
    different = [name for name, row in readme.items() if full.get(name) != row]
    assert not different, f"README.md rows differ from docs/arguments.md: {different}"


def test_every_docs_page_opens_with_its_purpose_and_a_link_back():
    for path in sorted((ROOT / "docs").glob("*.md")):
        opening = path.read_text().split("\n\n")[:3]
        assert opening[0].startswith("# "), f"{path.name}: no title"
        assert "(../README.md" in " ".join(opening[1:]), f"{path.name}: no link back to the README"
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.name not in index]
    assert not missing, f"docs/README.md does not list {missing}"
