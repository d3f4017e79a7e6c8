"""The README is the front door: every command, flag, config key and library call it shows must exist.

Static checks, all read out of ``README.md`` itself (nothing is trained or loaded):

- every ``deltatune <command> ...`` (code blocks and inline code, ``torchrun ... -m deltatune`` too) names
  a real command, and its arguments parse with that command's own parser (typer/click): a complete
  command in a code block must also give every required argument; a fragment (with ``...``) only needs
  known flags;
- every ``--set key=value`` validates as a training config (``load_config``: the key exists and the
  value is right for it, with the line's ``--task`` and ``model``); the one the README shows as a bad
  value must fail, naming the key; so do the ``key: value`` spans and the keys of the "Training
  options" table and the "Training config" list;
- ``--methods`` (each method named, on the line's task and settings), ``--task``, ``--budget`` and the
  few choice flags hold values the command accepts;
- every ``python -m bench.X`` module exists and the flags shown parse with its ``argparse`` parser,
  rebuilt from the module's ``add_argument`` calls (read with ``ast``, so no bench is imported);
- every ``make`` target exists in the Makefile;
- every ``dt.name`` / ``deltatune.name`` (code blocks and inline code) resolves, every call of one binds
  to its signature, every ``dt.<Name>Config(...)`` builds with the values shown (the one shown failing
  fails as said), and every ``from deltatune... import`` works;
- every relative link and every repository path in inline code exists.

Each check names the README line, so a typo there fails with the line to fix. The snippets themselves
are not run here: each needs a model, a batch and saved adapters (importing transformers and building
tiny models takes ~5 s on the 2-core CI machine, more than this whole file); they were run by hand on
tiny BERT / Llama models.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.main

import deltatune
from deltatune.cli import app
from deltatune.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"&", "&&", ";", "|", "||"}


@dataclass(frozen=True)
class Command:
    line: int  # where it starts in README.md
    argv: tuple[str, ...]  # tokens after the program: ("train", "--set", "epochs=1")
    whole: bool  # a complete command (required arguments given) rather than a fragment of one
    program: str  # "deltatune", "bench.<module>" or "make"

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.program} {' '.join(self.argv)}"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _blocks(text: str) -> list[tuple[str, int, str]]:
    """Fenced code blocks as (language, line of the first code line, body)."""
    return [(m.group(1), _line_of(text, m.start(2)), m.group(2)) for m in FENCE.finditer(text)]


def _inline(text: str) -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, whitespace collapsed (a span may cross a line break)."""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [(_line_of(prose, m.start()), " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose)]


def _split(line: str) -> list[list[str]]:
    """A shell line (comments dropped) as its commands, split at ``&``, ``&&``, ``;`` and pipes."""
    commands: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _command(tokens: list[str], line: int, whole: bool) -> Command | None:
    """The deltatune / bench / make command in ``tokens``, or None for any other program."""
    if tokens[0] in ("torchrun", "python", ".venv/bin/python") and "-m" in tokens:
        at = tokens.index("-m")
        module, tokens = tokens[at + 1], tokens[at + 1:]
        if module == "deltatune":
            tokens = ["deltatune", *tokens[1:]]
        elif module.startswith("bench."):
            tokens = [module, *tokens[1:]]
        else:
            return None
    program, args = tokens[0], tokens[1:]
    if program not in ("deltatune", "make") and not program.startswith("bench."):
        return None
    if "..." in args:  # "... more flags": a fragment
        args, whole = [a for a in args if a != "..."], False
    return Command(line, tuple(args), whole, program)


def _commands(text: str) -> list[Command]:
    found: list[Command] = []
    for language, first, body in _blocks(text):
        if language not in ("bash", "sh", "shell"):
            continue
        lines = body.split("\n")
        i = 0
        while i < len(lines):  # join continued lines ("\" at the end)
            start, line = first + i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            for tokens in _split(line):
                command = _command(tokens, start, whole=True)
                if command:
                    found.append(command)
    for line, span in _inline(text):
        if re.match(r"bench\.\w+ ", span):  # "`bench.run --workloads minilm`": the module, run with python -m
            span = f"python -m {span}"
        if re.match(r"(deltatune|make|torchrun|(\.venv/bin/)?python -m) ", span):
            for tokens in _split(span):
                command = _command(tokens, line, whole=True)
                # "`deltatune merge`" names the command; with arguments, it is a command to run
                if command and (len(command.argv) > 1 or command.program != "deltatune"):
                    found.append(command)
                elif command:
                    found.append(Command(line, command.argv, False, command.program))
    return found


TEXT = README.read_text(encoding="utf-8")
COMMANDS = _commands(TEXT)
CLI = [c for c in COMMANDS if c.program == "deltatune"]
BENCH = [c for c in COMMANDS if c.program.startswith("bench.")]
MAKE = [c for c in COMMANDS if c.program == "make"]
GROUP = typer.main.get_command(app)


def _ids(commands: list[Command]) -> list[str]:
    return [f"L{c.line}-{' '.join(c.argv)[:40]}" for c in commands]


def test_the_readme_is_read() -> None:
    """The extraction itself finds what the README shows (a broken parser must not pass quietly)."""
    assert len(CLI) >= 60 and len(BENCH) >= 12 and len(MAKE) >= 5
    assert {c.argv[0] for c in CLI if c.argv} == set(GROUP.commands)  # every command is shown at least once


# --- deltatune commands --------------------------------------------------------------------------------


def _option(argv: tuple[str, ...], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--flag v`` or ``--flag=v``)."""
    values = []
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif token.startswith(flag + "="):
            values.append(token.split("=", 1)[1])
    return values


@pytest.mark.parametrize("command", CLI, ids=_ids(CLI))
def test_cli_command_parses(command: Command) -> None:
    assert command.argv, f"{command}: no command given"
    name, args = command.argv[0], list(command.argv[1:])
    assert name in GROUP.commands, f"{command}: no command {name!r}; commands: {', '.join(GROUP.commands)}"
    try:
        GROUP.commands[name].make_context(name, args, resilient_parsing=not command.whole)
    except typer.TyperException as err:  # click's UsageError and friends
        pytest.fail(f"{command}: {type(err).__name__}: {err.format_message()}")


def test_train_help_names_every_task() -> None:
    """``deltatune train --help`` lists the tasks; the README shows every one of them."""
    from deltatune.train.tasks import TASKS

    helptext = " ".join((GROUP.commands["train"].help or "").split())
    for task in TASKS:
        assert re.search(rf"\b{task}\b", helptext), f"deltatune train --help does not name task {task!r}"
        assert f"task={task}" in TEXT or task == "sentiment", f"README shows no --set task={task}"


#: --set assignments the README shows as bad input (they must fail, naming the key)
SHOWN_AS_BAD = {"adapter.rank=abc": "adapter.rank",
                "epochs": "--set expects key=value"}  # `--set epochs 1`: a space for '=', named as such


def _set_groups() -> list[tuple[str, int, list[str]]]:
    """Each command's (or inline span's) ``--set`` assignments, with its ``--task`` and model."""
    groups = []
    for c in CLI:
        sets = _option(c.argv, "--set")
        context = [f"task={t}" for t in _option(c.argv, "--task")]
        if c.argv and c.argv[0] in ("plan", "inspect") and len(c.argv) > 1 and not c.argv[1].startswith("-"):
            context.append(f"model={c.argv[1]}")
        if sets:
            groups.append((str(c), c.line, context + sets))
    for line, span in _inline(TEXT):
        if span.startswith("--set "):
            groups.append((f"README.md:{line}: {span}", line, _option(tuple(shlex.split(span)), "--set")))
    return groups


SET_GROUPS = _set_groups()


@pytest.mark.parametrize(("where", "line", "sets"), SET_GROUPS, ids=[f"L{g[1]}" for g in SET_GROUPS])
def test_set_assignments_validate(where: str, line: int, sets: list[str]) -> None:
    bad = [s for s in sets if s in SHOWN_AS_BAD]
    for assignment in bad:
        with pytest.raises(ValueError, match=re.escape(SHOWN_AS_BAD[assignment])):
            load_config(None, [assignment])
    # a placeholder value ("data.path=...") is shown for its key only: any value of the right type stands in
    sets = [s.replace("=...", "=x") for s in sets if s not in bad]
    if sets:
        try:
            load_config(None, sets)
        except ValueError as err:
            pytest.fail(f"{where}: {err}")


def test_set_examples_exist() -> None:
    assert len(SET_GROUPS) >= 25
    assert any("adapter.rank=abc" in s for _, _, s in SET_GROUPS)  # the bad example is still checked


def _config_keys() -> list[tuple[int, str, list[str]]]:
    """Config keys the prose shows: ``key: value`` spans (``a | b``: each alternative; ``N``: any
    number), and every key of the "Training options" table and the "Training config" list."""
    from deltatune.train.schema import TrainConfig

    found = []
    for line, span in _inline(TEXT):
        match = re.fullmatch(r"([a-z_]+):(?: (.+))?", span)
        if match and match.group(1) in TrainConfig.model_fields:  # rank: 1.5 and friends are the bad examples
            values = [v.strip() for v in (match.group(2) or "").replace("\\|", "|").split("|")]
            found.append((line, match.group(1), [v for v in values if v and v != "N"]))
    lines = TEXT.split("\n")
    table = next(i for i, row in enumerate(lines) if row.startswith("**Training options**"))
    while not lines[table].startswith("|"):
        table += 1
    while lines[table].startswith("|"):  # the first column of every row: `key: N`, `key`, `a`, `b`
        first_cell = lines[table].replace("\\|", "/").split("|")[1]
        found += [(table + 1, key, []) for key in re.findall(r"`([a-z_]+)", first_cell)]
        table += 1
    bullet = next(i for i, row in enumerate(lines) if row.startswith("- **Training config**"))
    text = " ".join(lines[bullet: bullet + 4]).split(":", 1)[1].split(";")[0]  # the keys, up to the first ";"
    found += [(bullet + 1, key, []) for key in re.findall(r"`([a-z_]+)", text)]
    return found


CONFIG_KEYS = _config_keys()


@pytest.mark.parametrize(("line", "key", "values"), CONFIG_KEYS, ids=[f"L{k[0]}-{k[1]}" for k in CONFIG_KEYS])
def test_config_keys_in_prose(line: int, key: str, values: list[str]) -> None:
    from deltatune.train.schema import TrainConfig

    assert key in TrainConfig.model_fields, f"README.md:{line}: {key} is not a training config key"
    context = {"strategy": ["method=lora"], "quantize": ["method=lora"]}.get(key, [])
    for value in values:
        try:
            load_config(None, [*context, f"{key}={value}"])
        except ValueError as err:
            pytest.fail(f"README.md:{line}: {key}: {value}: {err}")


def test_config_keys_found() -> None:
    keys = {k for _, k, _ in CONFIG_KEYS}
    assert {"frozen_dtype", "gradient_accumulation", "tensorboard", "quantize_skip", "task"} <= keys


@pytest.mark.parametrize("command", CLI, ids=_ids(CLI))
def test_cli_values(command: Command) -> None:
    """Values the command checks itself before any work: methods, task, budget, formats."""
    from deltatune.train.budget import parse_budget
    from deltatune.train.compare import parse_methods
    from deltatune.train.tasks import TASKS

    name = command.argv[0] if command.argv else ""
    context = [f"task={t}" for t in _option(command.argv, "--task")] + _option(command.argv, "--set")
    try:
        for spec in _option(command.argv, "--methods"):
            names, every = parse_methods(spec)
            for method in [] if every else names:  # each method named runs on this task and these settings
                load_config(None, [*context, f"method={method}"])
        for text in _option(command.argv, "--budget"):
            parse_budget(text)
    except ValueError as err:
        pytest.fail(f"{command}: {err}")
    for task in _option(command.argv, "--task"):
        assert task in TASKS, f"{command}: unknown task {task!r}"
    from deltatune.cli.export import FORMATS
    from deltatune.core.combine import HOWS
    from deltatune.integrations.quantize import QUANT_FORMATS

    choices = {("export", "--format"): set(FORMATS), ("export", "--quantize"): {"int8"},
               ("merge", "--quantize"): set(QUANT_FORMATS), ("convert", "--to"): {"peft", "deltatune"},
               ("combine", "--how"): set(HOWS)}
    for (cmd, flag), allowed in choices.items():
        if name == cmd:
            for value in _option(command.argv, flag):
                assert value in allowed, f"{command}: {flag} {value!r} is not one of {sorted(allowed)}"


# --- bench modules -------------------------------------------------------------------------------------


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Refused(message)


_TYPES = {"int": int, "float": float}


def bench_parser(module: str) -> argparse.ArgumentParser:
    """The module's argparse parser, rebuilt from its ``add_argument`` calls without importing it.

    Flags, actions, ``nargs``, ``required`` and literal ``choices`` are kept; ``type`` only for int and
    float (a Path or a custom type is read as a string)."""
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"no {path.relative_to(ROOT)} for python -m {module}"
    parser = _Parser(prog=f"python -m {module}", allow_abbrev=False)  # a shortened flag is a typo here
    calls = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"]
    assert calls, f"{path.relative_to(ROOT)} has no argparse parser"
    for call in calls:
        names = [ast.literal_eval(a) for a in call.args]  # a flag built at run time is not read here: fail
        kwargs: dict = {}
        for kw in call.keywords:
            if kw.arg in ("action", "nargs", "required", "dest", "metavar"):
                kwargs[kw.arg] = ast.literal_eval(kw.value)
            elif kw.arg == "choices":
                try:
                    kwargs["choices"] = ast.literal_eval(kw.value)
                except ValueError:
                    pass  # computed choices: any value
            elif kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id in _TYPES:
                kwargs["type"] = _TYPES[kw.value.id]
        parser.add_argument(*names, **kwargs)
    return parser


@pytest.mark.parametrize("command", BENCH, ids=_ids(BENCH))
def test_bench_command_parses(command: Command) -> None:
    parser = bench_parser(command.program)
    try:
        if command.whole:
            parser.parse_args(list(command.argv))
        else:
            parser.parse_known_args(list(command.argv))
            flags = {s for a in parser._actions for s in a.option_strings}
            unknown = [t for t in command.argv if t.startswith("--") and t.split("=")[0] not in flags]
            assert not unknown, f"{command}: unknown {unknown}"
    except _Refused as err:
        pytest.fail(f"{command}: {err}")


def test_bench_parser_sees_a_typo() -> None:
    for argv in (["--seedz", "0,1"], ["--test-position", "10"]):
        with pytest.raises(_Refused):
            bench_parser("bench.recommend_segments").parse_args(argv)


# --- make targets --------------------------------------------------------------------------------------


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.MULTILINE))
    for command in MAKE:
        wanted = [a for a in command.argv if "=" not in a]  # VAR=value assignments are not targets
        missing = [t for t in wanted if t not in targets]
        assert not missing, f"{command}: no Makefile target {missing}"


# --- the library ---------------------------------------------------------------------------------------


def _resolve(dotted: str) -> object:
    """``deltatune.integrations.distributed.wrap_ddp`` -> the object (importing submodules as needed)."""
    import importlib

    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            obj = importlib.import_module(".".join(parts[: i + 1]))
        else:
            obj = getattr(obj, part)
    return obj


def _python_snippets() -> list[tuple[int, str]]:
    """Python code blocks, and inline code that parses as Python and uses ``dt.`` or ``deltatune.``."""
    snippets = [(line, body) for language, line, body in _blocks(TEXT) if language == "python"]
    for line, span in _inline(TEXT):
        code = span.removeprefix("with ").rstrip(": .")  # "with dt.cpu_engine("thin"): ..."
        if re.search(r"\b(dt|deltatune)\.\w", code):
            try:
                ast.parse(code)
            except SyntaxError:
                continue
            snippets.append((line, code))
    return snippets


SNIPPETS = _python_snippets()


def _placeholder_call(call: ast.Call) -> bool:
    """``f(...)`` or ``f(x, ..., y)``: arguments left out on purpose."""
    return any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in call.args)


@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"L{s[0]}" for s in SNIPPETS])
def test_library_names_resolve(line: int, code: str) -> None:
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deltatune":
            for alias in node.names:
                assert hasattr(_resolve(node.module), alias.name), \
                    f"README.md:{line}: from {node.module} import {alias.name}: no such name"
        dotted = _dotted(node)
        if dotted and dotted.split(".")[0] in ("dt", "deltatune"):
            name = "deltatune" + dotted[dotted.index(".") :]
            try:
                obj = _resolve(name)
            except (ImportError, AttributeError) as err:
                pytest.fail(f"README.md:{line}: {dotted} does not resolve ({err})")
            if isinstance(node, ast.Call) and not _placeholder_call(node) and callable(obj):
                args = [None] * sum(not isinstance(a, ast.Starred) for a in node.args)
                kwargs = {kw.arg: None for kw in node.keywords if kw.arg}
                if any(isinstance(a, ast.Starred) for a in node.args) or any(kw.arg is None for kw in node.keywords):
                    continue
                try:
                    inspect.signature(obj).bind(*args, **kwargs)
                except TypeError as err:
                    pytest.fail(f"README.md:{line}: {ast.unparse(node)[:80]}: {err}")


#: config calls the README shows failing, and what it says they raise
SHOWN_FAILING = {ast.unparse(ast.parse('dt.LoraConfig(rank="8")')): (TypeError, ValueError)}


@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"L{s[0]}" for s in SNIPPETS])
def test_config_calls_build(line: int, code: str) -> None:
    """Every ``dt.<Name>Config(...)`` in the README builds with the values shown (they need no model)."""
    for node in ast.walk(ast.parse(code)):
        dotted = _dotted(node) if isinstance(node, ast.Call) else None
        if not dotted or not dotted.startswith("dt.") or not dotted.endswith("Config") or _placeholder_call(node):
            continue
        source = ast.unparse(node)
        expression = compile(ast.Expression(node), f"README.md:{line}", "eval")
        if source in SHOWN_FAILING:
            for error in SHOWN_FAILING[source]:
                with pytest.raises(error):
                    eval(expression, {"dt": deltatune})  # the README's own expression
            continue
        try:
            eval(expression, {"dt": deltatune})
        except Exception as err:  # noqa: BLE001 - any failure is the README's to fix
            pytest.fail(f"README.md:{line}: {source[:80]}: {type(err).__name__}: {err}")


def test_config_calls_found() -> None:
    calls = {ast.unparse(n) for _, code in SNIPPETS for n in ast.walk(ast.parse(code))
             if isinstance(n, ast.Call) and (_dotted(n) or "").endswith("Config")}
    assert len(calls) >= 6 and set(SHOWN_FAILING) <= calls


def _dotted(node: ast.AST) -> str | None:
    """``dt.routing`` for the node ``dt.routing`` or the call ``dt.routing(...)``; None otherwise."""
    target = node.func if isinstance(node, ast.Call) else node
    if not isinstance(node, ast.Call) and not isinstance(node, ast.Attribute):
        return None
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not isinstance(target, ast.Name) or not parts:
        return None
    return ".".join([target.id, *reversed(parts)])


#: Names the prose lists by themselves (`wrap_ddp`, ...) and the module it says holds them.
NAMED_IN_PROSE = {
    "deltatune.integrations.distributed": ["wrap_ddp", "shard", "gather_adapter_state", "save_on_rank0"],
    "deltatune.train.segments": ["segment_route", "keep_segments", "taste_segments"],
    "deltatune": ["grow_table", "NoMatchError"],
    "deltatune.config.AdapterConfig": ["suggested_lr", "search_space", "family"],
    "deltatune.core.plumbing": ["PROVIDERS"],
    "deltatune.train.recommend": ["held_out"],
}


def test_names_in_prose_exist() -> None:
    for module, names in NAMED_IN_PROSE.items():
        for name in names:
            named = re.search(rf"(`[\w.]*|^){name}\b", TEXT, re.MULTILINE)
            assert named, f"README no longer names {name}; update this test"
            assert hasattr(_resolve(module), name), f"README names {module}.{name}, which does not exist"


# --- files the README points to ------------------------------------------------------------------------

#: first path parts that are this repository's (runs/, out/, adapters/ ... are the user's)
REPO_ROOTS = ("src/", "tests/", "bench/", "docs/", "requirements/", ".ci/", "Makefile", "pyproject.toml")
PACKAGE_PARTS = ("train/", "core/", "formats/", "integrations/", "serve/", "export/", "methods/", "cli/")


def _paths() -> list[tuple[int, str]]:
    found = [(_line_of(TEXT, m.start()), m.group(1)) for m in re.finditer(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", TEXT)]
    for line, span in _inline(TEXT):
        if " " in span or "*" in span:
            continue
        if span.startswith(REPO_ROOTS) or (span.startswith(PACKAGE_PARTS) and span.endswith(".py")):
            found.append((line, span))
    return found


PATHS = _paths()


@pytest.mark.parametrize(("line", "path"), PATHS, ids=[f"L{p[0]}-{p[1]}" for p in PATHS])
def test_paths_exist(line: int, path: str) -> None:
    candidates = [ROOT / path, ROOT / "src" / "deltatune" / path]
    assert any(p.exists() for p in candidates), f"README.md:{line}: {path} does not exist"
