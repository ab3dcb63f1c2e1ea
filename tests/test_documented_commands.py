"""Every command that README, docs/, the programs' --help texts and their error messages suggest works as
written, checked without running the long jobs: the make target exists, the module or script exists, the
program's own argument parser (DeepSpeed's launcher's too) accepts the arguments, and the repository
files it names exist.  `[...]` in a command is optional syntax and `...` stands for "your other
arguments": both are left out; UPPERCASE words are placeholders for values."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from launch import ROOT

# `python -m MODULE` -> the function its __main__ runs (each takes argv)
MAINS = {
    "ds_smoes.train": "ds_smoes.app.train:main",
    "ds_smoes.export": "ds_smoes.app.export:main",
    "ds_smoes.reshard": "ds_smoes.reshard:main",
    "ds_smoes.compare": "ds_smoes.app.compare:main",
    "ds_smoes.bench": "ds_smoes.bench.cli:main",
    "ds_smoes.sweep": "ds_smoes.sweep.cli:main",
    "ds_smoes.hf.tiny": "ds_smoes.hf.tiny:main",
    "ds_smoes.data.digits": "ds_smoes.data.digits:main",
    "ds_smoes.pretrain_vision": "ds_smoes.app.pretrain_vision:main",
    "ds_smoes.pipeline": "ds_smoes.app.pipeline_cli:main",
}
SCRIPTS = {"ray_jobs/sweep.py": "ds_smoes.sweep.cli:main"}
PROGRAM = re.compile(r"^(\S*/)?(python3?(\.\d+)?|deepspeed|make|ray|mlflow)\s")
GENERATED = ("runs/", "data/", "mlruns/")   # written by earlier steps of the docs' own recipes


def fenced_bash(text: str):
    inside, lang, buf = False, "", []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            if inside:
                if lang in ("bash", "sh", ""):
                    yield "\n".join(buf)
                inside, buf = False, []
            else:
                inside, lang = True, s[3:].strip()
        elif inside:
            buf.append(line)


def command_lines(text: str):
    """The command lines of a shell snippet, continuations joined, with the values of the snippet's own
    `NAME=value` lines (and $PWD) put in for $NAME."""
    shell_vars = {"PWD": str(ROOT)}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        s = line.strip()
        assignments = re.findall(r"(?:^|\s)([A-Z_]+)=(\S+)", s.split("#")[0])
        if assignments and re.fullmatch(r"(\s*[A-Z_]+=\S+)+\s*", s.split("#")[0]):
            shell_vars.update(assignments)
            continue
        s = re.sub(r"\$(\w+)", lambda m: shell_vars.get(m.group(1), m.group(0)), s)
        words = s.split()
        if PROGRAM.match(s + " ") and " -c " not in s and not (len(words) < 3 and "python" in words[0]):
            yield s   # (a bare "python -m" in prose names no command)


def documented() -> list[tuple[str, str]]:
    """(where, command) from README, docs/*.md, configs/*.yaml comments, the programs' docstrings (their
    --help) and the commands quoted in backticks by the package's messages."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in fenced_bash(path.read_text()):
            out += [(path.name, c) for c in command_lines(block)]
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        comments = "\n".join(l.split("#", 1)[1] for l in path.read_text().splitlines() if "#" in l)
        out += [(path.name, c) for c in command_lines(comments)]
    for path in sorted((ROOT / "ds_smoes").rglob("*.py")) + [ROOT / "ray_jobs" / "sweep.py"]:
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        out += [(f"{where} (docstring)", c) for c in command_lines(ast.get_docstring(tree) or "")]
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):   # messages: strings that are not docstrings (those name commands in prose)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for quoted in re.findall(r"`([^`]+)`", node.value):
                    out += [(f"{where} (message)", c) for c in command_lines(quoted)]
            elif isinstance(node, ast.JoinedStr):   # an f-string: its literal parts, placeholders as N
                text = "".join(v.value if isinstance(v, ast.Constant) else "2" for v in node.values)
                for quoted in re.findall(r"`([^`]+)`", text):
                    out += [(f"{where} (message)", c) for c in command_lines(quoted)]
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


class _Parsed(BaseException):
    """Raised by the patched parser once it has accepted the arguments: nothing runs after it."""


def parses(target: str, argv: list[str]) -> argparse.Namespace:
    module, _, func = target.partition(":")
    main = getattr(importlib.import_module(module), func)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except _Parsed as done:
            return done.args[0]
        except SystemExit as exit_:
            if exit_.code == 0:   # --help
                return argparse.Namespace()
            raise AssertionError(f"{target} rejects {argv} (exit {exit_.code})") from None
    raise AssertionError(f"{target} returned without parsing its arguments")


def ray_parses(argv: list[str]) -> None:
    """Ray's click CLI parses `ray SUBCOMMAND ...` (nothing runs)."""
    import click
    from ray.scripts.scripts import cli

    cmd, args, name = cli, list(argv), "ray"
    while isinstance(cmd, click.Group):
        name = args.pop(0)
        cmd = cmd.get_command(click.Context(cli), name)
        assert cmd is not None, f"no ray command {name!r}"
    try:
        cmd.make_context(name, args)
    except click.UsageError as err:
        raise AssertionError(f"ray {name} rejects {args}: {err}") from None


def check_files(tokens: list[str]) -> None:
    for tok in tokens:
        value = tok.split("=", 1)[-1]
        if re.match(r"^[\w./-]+\.(ya?ml|json|py)$", value) and not value.startswith(GENERATED) \
                and "/" in value and not value.startswith("/"):
            assert (ROOT / value).exists(), f"{value} does not exist in the repository"


def check(command: str) -> None:
    command = re.sub(r"\s\[[^\]]*\]", "", command)           # optional parts
    tokens = [t for t in shlex.split(command, comments=True) if t not in ("...", "…")]   # "and the rest"
    for i, tok in enumerate(tokens):   # the command ends where the shell's redirections or operators begin
        if re.match(r"^(\d?>|>|\||&|;)", tok):
            tokens = tokens[:i]
            break
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):       # VAR=value prefixes
        tokens.pop(0)
    program = Path(tokens[0]).name
    if program == "make":
        missing = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t and t not in make_targets()]
        assert not missing, f"no make target {missing}"
        return
    if program == "ray":
        ray_parses(tokens[1:])
        if tokens[1:3] == ["job", "submit"] and "--" in tokens:
            check(shlex.join(tokens[tokens.index("--") + 1:]))   # the job's own command
        return
    if program == "mlflow":
        return
    if program == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        try:
            launch = parse_args(tokens[1:])
        except SystemExit as exit_:
            raise AssertionError(f"DeepSpeed's launcher rejects {tokens[1:]} (exit {exit_.code})") from None
        assert launch.module, f"{command}: run modules with --module (DeepSpeed's launcher has no -m)"
        module, argv = launch.user_script, launch.user_args
    elif tokens[1] == "-m":
        module, argv = tokens[2], tokens[3:]
    else:                                                     # python SCRIPT ...
        assert (ROOT / tokens[1]).is_file(), f"{tokens[1]} does not exist"
        assert tokens[1] in SCRIPTS, f"add {tokens[1]} to SCRIPTS"
        parses(SCRIPTS[tokens[1]], tokens[2:])
        check_files(tokens[2:])
        return
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    assert module in MAINS, f"{module}: add its main to MAINS so its arguments are checked"
    parses(MAINS[module], argv)
    check_files(argv)


COMMANDS = documented()


def test_the_docs_and_messages_name_commands():
    sources = {where.split(" ")[0] for where, _ in COMMANDS}
    assert {"README.md", "ds_smoes/app/train.py", "ray_jobs/sweep.py"} <= sources, sources
    assert any("(message)" in where for where, _ in COMMANDS)   # e.g. the ep_size error's launcher command
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_documented_command_works_as_written(where, command):
    check(command)


@pytest.mark.parametrize("command, problem", [
    ("deepspeed --num_gpus 2 -m ds_smoes.train --config configs/demo.yaml", "launcher rejects"),
    ("python -m ds_smoes.train --conifg configs/demo.yaml", "rejects"),
    ("python -m ds_smoes.train --config configs/nope.yaml", "does not exist"),
    ("python -m ds_smoes.trainer", "no module"),
    ("make demos", "no make target"),
    ("ray start --head --num-cpu 8", "ray start rejects"),
    ("ray job submit --address http://127.0.0.1:8265 -- python -m ds_smoes.trainer", "no module"),
    ("python ray_jobs/sweep.py run configs/sweeps/smoke.yaml --max-trials 2", "rejects"),
])
def test_the_checker_catches_what_it_must(command, problem):
    with pytest.raises(AssertionError, match=problem):
        check(command)
