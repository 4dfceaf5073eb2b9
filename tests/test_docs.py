"""The docs cannot drift: what README.md and docs/*.md name exists, what they quote stands, what they run runs.

(a) Every name in backticks that points into the project exists: files and folders, tests
    (``file::test``), ``module.name`` (read from the module's source), bare ``Class`` or ``function()``
    names (defined in the project or in the library named), and every ``--flag`` (a flag of one of the
    project's parsers, of ``accelerate launch``/``torchrun``, or of a shell script). Links to local files
    resolve. A ```python block that opens with ``# path/to/file.py`` is an excerpt: its lines must stand in
    that file, in order (``# ...`` comments mark what is left out).
(b) Every command in a ```bash block runs: offline ones fully, on a tiny budget (a tiny model unless
    the command names one, at most 2 optimizer steps on 64 rows, 32 scored, one epoch; the bench runs its
    own loop's arm only, once), Hub ones up to their clean
    refusal offline (exit code 2, one ``error:`` line, no traceback), and the ones that need a GPU or
    the network are skipped, with the reason. ``python train_loop.py --help`` and ``python eval.py --help``
    run as users run them, in a fresh process.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import sentiment_rows, write_csv

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in REPO.glob("*.py"))
TEST_FILES = {p.name: p for p in sorted((REPO / "tests").rglob("test_*.py"))}


def doc_text(path: Path) -> str:
    return path.read_text()


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, line number of the first line, body)`` of every ``` block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if match:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((match.group(1), start + 1, "\n".join(body)))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced blocks and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


# ---------------------------------------------------------------------------------------------- (a) names
def defined_names(path: Path) -> set[str]:
    """Names a module defines: functions, classes, their methods, and assigned names (top level and class)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


PROJECT_FILES = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "site-packages" not in p.parts
                 and p != Path(__file__).resolve()]  # not this file: it names made-up things on purpose
PROJECT_NAMES = set().union(*(defined_names(p) for p in PROJECT_FILES))
# Every word of the project's code and configs: a snake_case name the docs give (a metric, a config key, a
# library function the code calls) must at least occur there.
PROJECT_WORDS = set(re.findall(r"\w+", " ".join(p.read_text() for p in [*PROJECT_FILES, *REPO.glob("configs/**/*.yaml"),
                                                                         *REPO.glob("scripts/*.sh")])))
# Where a bare library name (a class or function named without its module) may live.
LIBRARIES = ["builtins", "accelerate.Accelerator", "accelerate", "accelerate.scheduler", "accelerate.utils", "transformers", "peft", "torch",
             "torch.nn", "torch.nn.functional", "torch.optim", "torch.optim.Optimizer", "torch.optim.lr_scheduler",
             "torch.utils.data", "torch.distributed.fsdp", "torch.distributed.checkpoint.state_dict", "datasets",
             "safetensors.torch", "onnxruntime"]


def resolve(dotted: str):
    """The object a dotted path names (``torch.optim.Optimizer.zero_grad``), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def library_has(dotted: str) -> bool:
    """``torch.randint``, ``accelerate.utils.set_seed``: importable module + attributes."""
    return resolve(dotted) is not None


def bare_library_name(name: str) -> bool:
    return any(hasattr(resolve(place), name) for place in LIBRARIES)


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def entry_point_flags(main, argv=("--help",)) -> set[str]:
    """The flags of the parser a ``main(argv)`` builds, whatever builds it (argparse, HfArgumentParser):
    caught at its first parse, so no help text is formatted (a broken help text is (b)'s to report)."""
    real = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        main(list(argv))
    except _Captured as captured:
        return parser_flags(captured.parser)
    finally:
        argparse.ArgumentParser.parse_known_args = real
    raise AssertionError(f"{main} parsed no arguments")


def known_flags() -> dict[str, set[str]]:
    """Every flag a documented command may use, by the program that takes it."""
    import eval as evaluation
    import train_loop
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    flags = {"train_loop.py": entry_point_flags(train_loop.main), "eval.py": entry_point_flags(evaluation.main),
             "accelerate launch": parser_flags(launch_command_parser()), "torchrun": parser_flags(get_args_parser()),
             "pip": {"--no-deps"}, "sbatch": {"--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node",
                                               "--cpus-per-task"}}
    # Other scripts' own flags, read from their source: add_argument("--x") and shell `--x)` cases.
    for path in [*REPO.glob("bench/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("examples/**/*.py")]:
        flags[path.name] = set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", path.read_text()))
    for path in REPO.glob("scripts/*.sh"):
        flags[path.name] = set(re.findall(r"^\s*(--[\w-]+)\)", path.read_text(), flags=re.M))
    # The examples take train_loop.py's flags of the names in their FLAGS lists.
    flags["examples"] = {f"--{name}" for path in REPO.glob("examples/**/*.py")
                         for name in re.findall(r"[\"'](\w+)[\"']", " ".join(re.findall(r"FLAGS \+?= \[[^\]]*\]",
                                                                                        path.read_text(), re.S)))}
    return flags


PATH_ROOTS = {"bench", "configs", "docs", "examples", "scripts", "tests"}


def check_name(token: str, doc: Path, last_test_file: list) -> str | None:
    """None if ``token`` (one backticked span) names only things that exist, else what is missing."""
    token = token.strip()
    # A test: file::name, ::name (the file named last), or a bare test_ function.
    file, _, test = token.partition("::")
    if test and " " not in token and (file == "" or file.endswith(".py")):
        file = file.split("/")[-1] or (last_test_file[0] if last_test_file else "")
        test = test.split("[")[0]
        if file not in TEST_FILES:
            return f"test file {file!r}"
        last_test_file[:] = [file]
        return None if test in defined_names(TEST_FILES[file]) else f"test {file}::{test}"
    if re.fullmatch(r"test_\w+(\[[\w-]+\])?", token):
        name = token.split("[")[0]
        return None if any(name in defined_names(p) for p in TEST_FILES.values()) else f"test {name}"
    # A file or folder of the project.
    if re.fullmatch(r"[\w./+-]+", token) and (token.split("/")[0] in PATH_ROOTS or
                                              re.fullmatch(r"[\w-]+\.(py|sh|txt|md|yaml)", token)):
        if token.split("/")[0] in PATH_ROOTS or token.endswith((".py", ".sh")):
            candidates = [REPO / token] + [p for p in REPO.rglob(token) if ".venv" not in p.parts]
            if Path(token).name.startswith("test_"):
                last_test_file[:] = [Path(token).name]
            return None if any(c.exists() for c in candidates) else f"file {token}"
        return None  # outputs a run writes (report.md ...) or files a user supplies
    # module.name[.attr] of the project, or of a library (torch.randint, accelerate.utils.set_seed).
    dotted = re.fullmatch(r"([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)(\(.*\))?", token)
    if dotted:
        head, rest = dotted.group(1), dotted.group(2)[1:].split(".")
        if head in MODULES:
            names = defined_names(REPO / f"{head}.py")
            return None if all(part in names or part in PROJECT_NAMES for part in rest) else f"{head}.{'.'.join(rest)}"
        if head == "accelerator":
            from accelerate import Accelerator

            return None if hasattr(Accelerator, rest[0]) else f"Accelerator.{rest[0]}"
        if head in {"torch", "accelerate", "transformers", "peft", "datasets", "safetensors"}:
            return None if library_has(f"{head}.{'.'.join(rest)}") else token
        return None  # an attribute of some object (model.reshard(), train_loader.set_epoch(epoch) ...)
    # A bare function call name(...) or a CamelCase class name: defined in the project or a library.
    call = re.fullmatch(r"([a-z_]\w*)\(.*\)", token)
    camel = re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", token)
    name = call.group(1) if call else token if camel else None
    if name and name not in PROJECT_NAMES and not bare_library_name(name):
        return f"name {name}"
    # A bare snake_case name (a function, metric, config key): at least a word of the project's code.
    if re.fullmatch(r"[a-z]+_[a-z0-9_]+", token) and token not in PROJECT_WORDS and not bare_library_name(token):
        return f"name {token} in the code"
    return None


def flags_in(token: str) -> list[str]:
    return re.findall(r"(?<![\w-])(--[a-z][\w-]*)", token)


def test_every_name_the_docs_give_exists():
    flags = known_flags()
    all_flags = set().union(*flags.values())
    missing = []
    for doc in DOCS:
        last_test_file: list = []
        for token in inline_code(doc_text(doc)):
            problem = check_name(token, doc, last_test_file)
            if problem:
                missing.append(f"{doc.relative_to(REPO)}: `{token}`: no {problem}")
            missing += [f"{doc.relative_to(REPO)}: `{token}`: no flag {f}" for f in flags_in(token) if f not in all_flags]
    assert not missing, "\n" + "\n".join(missing)


def test_the_name_check_finds_what_does_not_exist():
    """The test above can fail: made-up names of each kind are reported."""
    for token in ["tests/test_nope.py", "test_train_loop.py::test_nope", "data.NoSampler", "NoSuchSampler",
                  "no_such_function()", "accelerator.no_such_method", "torch.no_such_op", "no_such_metric"]:
        assert check_name(token, DOCS[0], []), token
    assert "--no_such_flag" not in set().union(*known_flags().values())


def test_every_flag_of_train_loop_is_in_the_settings_doc():
    import train_loop

    documented = set(flags_in(doc_text(REPO / "docs" / "settings.md")))
    assert entry_point_flags(train_loop.main) - {"--help"} - documented == set()


def test_local_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(doc_text(doc))):
            if not re.match(r"\w+://", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert broken == []


def excerpts() -> list[tuple[str, str, str]]:
    """``(where, file, body)`` of every ```python block that opens with ``# path`` of a project file."""
    found = []
    for doc in DOCS:
        for language, line, body in fenced_blocks(doc_text(doc)):
            first = body.splitlines()[0] if body else ""
            match = re.match(r"#\s*([\w/]+\.py)\b", first)
            if language == "python" and match and (REPO / match.group(1)).is_file():
                found.append((f"{doc.relative_to(REPO)}:{line}", match.group(1), body))
    return found


def excerpt_problems(file: str, body: str) -> list[str]:
    """Each run of code lines between ``# ...`` comments must stand, in order, as consecutive code lines of
    the file (blank and comment-only lines of the file skipped; indentation may differ)."""
    code = [line.strip() for line in (REPO / file).read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
    runs, run = [], []
    for line in body.splitlines()[1:]:
        if not line.strip() or line.strip().startswith("#"):
            runs, run = runs + [run] if run else runs, []
        else:
            run.append(line.strip())
    runs += [run] if run else []
    problems, position = [], 0
    for run in runs:
        starts = [i for i in range(position, len(code) - len(run) + 1) if code[i:i + len(run)] == run]
        if not starts:
            problems.append(f"{file} has no {run}")
        else:
            position = starts[0] + len(run)
    return problems


@pytest.mark.parametrize("where,file,body", excerpts(), ids=[e[0] for e in excerpts()])
def test_quoted_code_stands_in_its_file(where, file, body):
    assert excerpt_problems(file, body) == []


def test_the_readme_shows_the_loop_early_and_stays_short():
    lines = doc_text(REPO / "README.md").splitlines()
    first_code = next(i + 1 for i, line in enumerate(lines) if line.strip() == "```python")
    print(f"README.md: {len(lines)} lines, loop code first at line {first_code}")
    assert len(lines) <= 250 and first_code <= 80
    assert any(e[0].startswith("README.md") and e[1] == "train_loop.py" for e in excerpts())


def test_an_excerpt_that_no_longer_stands_is_reported():
    body = "# train_loop.py\noptimizer.step()\n"
    assert excerpt_problems("train_loop.py", body) == []
    assert excerpt_problems("train_loop.py", body.replace("optimizer.step()", "optimizer.step(2)"))


# ------------------------------------------------------------------------------------------- (b) commands
@dataclass
class Command:
    where: str  # doc:line
    env: dict
    argv: list[str]

    @property
    def text(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


def split_env(words: list[str]) -> tuple[dict, list[str]]:
    """Leading ``NAME=value`` words as an environment, and the command after them."""
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        name, _, value = words[0].partition("=")
        env[name], words = value, words[1:]
    return env, words


def commands() -> list[Command]:
    """Every command of every ```bash block: continuation lines joined, comments dropped, ``VAR=value``
    lines of the block expanded where ``$VAR`` is used, leading ``NAME=value`` words kept as environment."""
    found = []
    for doc in DOCS:
        for language, line, body in fenced_blocks(doc_text(doc)):
            if language != "bash":
                continue
            variables = {}
            for offset, logical in logical_lines(body):
                words = shlex.split(logical, comments=True)
                if not words:
                    continue
                if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    name, _, value = words[0].partition("=")
                    variables[name] = value
                    continue
                words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), logical),
                                    comments=True)
                env, words = split_env(words)
                found.append(Command(f"{doc.relative_to(REPO)}:{line + offset}", env, words))
    return found


def logical_lines(body: str):
    lines, start, current = body.splitlines(), 0, ""
    for i, line in enumerate(lines):
        if not current:
            start = i
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        yield start, current + line
        current = ""


def program(argv: list[str]) -> tuple[str, list[str]]:
    """``(script, its arguments)``: the launcher (python, accelerate launch + its flags, make, bash) taken off."""
    words = list(argv)
    head = Path(words[0]).name
    if head in {"python", "python3"}:
        return words[1], words[2:]
    if head == "accelerate" and words[1] == "launch":
        i = 2
        while i < len(words) and not words[i].endswith(".py"):
            i += 1
        return words[i], words[i + 1:]
    if head == "torchrun":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[i], words[i + 1:]
    if head == "bash":
        return words[1], words[2:]
    return head, words[1:]


def launcher_flags(argv: list[str]) -> list[str]:
    script, _ = program(argv)
    return argv[:argv.index(script)] if script in argv else argv


HUB = re.compile(r"^(?!embedded:)[\w.-]+(/[\w.-]+)?$")
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt")


def classify(command: Command) -> tuple[str, str]:
    """``("run" | "hub" | "skip", reason)``."""
    script, args = program(command.argv)
    text = command.text
    if script in {"pip", "make"} and (not args or args[0] in {"install", "gpu-kit", "setup"}):
        return "skip", "installs from PyPI (needs the network)"
    if "two_nodes" in text:
        return "skip", "needs two GPU machines"
    if "deepspeed" in text:
        return "skip", "needs CUDA and DeepSpeed"
    if "--config_file" in text or "--load_in_4bit" in text:
        return "skip", "needs CUDA"
    if script.endswith("gpu_check.sh") and "--dry-run" not in args:
        return "skip", "needs CUDA and the kit (docs/gpu.md)"
    values = dict(zip(args, args[1:]))
    for flag in ("--model", "--dataset"):
        value = values.get(flag)
        if value and HUB.match(value) and not value.endswith(DATA_SUFFIXES) and not value.startswith(("outputs", ".")):
            return "hub", f"{flag} {value} is a Hub name"
    return "run", ""


COMMANDS = commands()


def test_documented_commands_are_found_and_classified(capsys):
    kinds = [classify(c) for c in COMMANDS]
    counts = {kind: sum(k == kind for k, _ in kinds) for kind in ("run", "hub", "skip")}
    with capsys.disabled():
        print(f"\ndocumented commands: {len(COMMANDS)} found; {counts['run']} run fully offline (tiny budget), "
              f"{counts['hub']} run to their offline refusal, {counts['skip']} skipped")
        for command, (kind, reason) in zip(COMMANDS, kinds):
            if kind == "skip":
                print(f"  skipped: {command.where}: {reason}: {command.text}")
    assert len(COMMANDS) >= 20 and counts["run"] >= 10


# The data files the documented commands name, small and in the shape each command expects.
def write_inputs(folder: Path) -> None:
    rows = sentiment_rows(160)
    named = [(text, ["negative", "positive"][label]) for text, label in rows]
    write_csv(folder / "reviews.csv", [(t, ["neg", "pos"][y]) for t, y in rows], header=("review", "sentiment"))
    write_csv(folder / "other.csv", named[:60])
    write_csv(folder / "tickets.csv", [(t, y) for i, (t, y) in enumerate(rows) if y == 0 or i % 5 == 1])
    write_csv(folder / "my_tickets.csv", [(t, y) for i, (t, y) in enumerate(rows) if y == 0 or i % 5 == 1])
    for name, part in (("train.jsonl", named[:120]), ("test.jsonl", named[120:])):
        (folder / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in part))
    tags = [(t, ["pos" if y else "neg"] + (["funny"] if i % 3 == 0 else [])) for i, (t, y) in enumerate(rows)]
    (folder / "tags.jsonl").write_text("".join(json.dumps({"text": t, "labels": y}) + "\n" for t, y in tags))
    write_csv(folder / "tags.csv", [(t, "|".join(y)) for t, y in tags], header=("text", "labels"))
    (folder / "texts.txt").write_text("a gripping film\nsuperb and fun\ndull plot\n")


@contextlib.contextmanager
def chdir(folder: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


TINY_BUDGET = ["--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder to run the commands in: the input files, a trained tiny run in outputs/run (what the
    commands that read a run expect `make train` to have left), and the tiny model (``(folder, model)``)."""
    import train_loop

    from conftest import make_tokenizer, tiny_config
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("documented")
    write_inputs(folder)
    # conftest's tiny BERT, with room for the longest --max_length a documented command asks for (512).
    config = tiny_config("bert")
    config.max_position_embeddings = 512
    model = str(folder / "tiny-bert-512")
    AutoModel.from_config(config).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    os.symlink(REPO / "configs", folder / "configs")
    with chdir(folder):  # on a small CSV: what matters to the commands is a run in outputs/run
        assert train_loop.main(["--model", model, "--dataset", "other.csv", "--eval_size", "20", "--output_dir",
                                "outputs/run", *TINY_BUDGET]) == 0
    return folder, model


def tiny(command: Command, folder: Path, model: str) -> list[str]:
    """The command's arguments with a tiny budget added: the tiny model unless it names one, a fresh output
    dir when the one it names already holds a run (several commands write the default outputs/run)."""
    script, args = program(command.argv)
    names = set(args)
    extra = [] if "--model" in names else ["--model", model]
    if script.endswith(("train_loop.py", "bench_speed.py", "accuracy_sweep.py")):
        extra += [x for flag, value in zip(TINY_BUDGET[::2], TINY_BUDGET[1::2]) if flag not in names
                  for x in (flag, value)]
        if script.endswith("train_loop.py"):
            values = dict(zip(args, args[1:]))
            if (folder / values.get("--output_dir", "outputs/run")).exists() or "--output_dir" not in names:
                extra += ["--output_dir", f"outputs/cmd_{abs(hash(command.where))}"]
            if "--num_epochs" in names:
                extra += ["--num_epochs", "1"]
        elif script.endswith("bench_speed.py"):  # our loop's arm only, once (the Trainer arms cost minutes each)
            extra += ["--output", f"bench_{abs(hash(command.where))}.md", "--arms", "a", "--repeats", "1"]
        elif "--list" in names:  # the sweep's list of variants takes no run settings
            extra = []
    elif "examples" in script and script.endswith("loop.py") or "by_feature" in script:
        extra += ["--num_epochs", "1"]
    if "--help" in names or script.endswith(("eval.py", "multilabel_rotten_tomatoes.py")) or script == "make":
        extra = []
    return args + extra


def run_in_process(script: str, args: list[str], folder: Path) -> tuple[int, str]:
    """train_loop.py / eval.py / bench_speed.py through their main(): the same code, without a new process."""
    module = {"train_loop.py": "train_loop", "eval.py": "eval"}.get(Path(script).name)
    if module is None:
        sys.path.insert(0, str(REPO / "bench"))
        module = "bench_speed"
    main = importlib.import_module(module).main
    err = io.StringIO()
    with chdir(folder), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
    return code or 0, err.getvalue()


def run_process(argv: list[str], env: dict, folder: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    words = list(argv)
    head = Path(words[0]).name
    if head in {"python", "python3"}:
        words[0] = sys.executable
    elif head in {"accelerate", "torchrun"}:
        words[0] = str(BIN / head)
    for i, w in enumerate(words):  # scripts are the repo's (the workspace holds only inputs and outputs)
        if w.endswith((".py", ".sh")) and (REPO / w).is_file():
            words[i] = str(REPO / w)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(words, capture_output=True, text=True, timeout=timeout, cwd=folder, env=full_env)


def make_recipe(target: str, args: str = "") -> list[str]:
    """What ``make TARGET`` runs, with setup already done (this test runs inside the installed venv)."""
    venv = str(BIN.parent)
    out = subprocess.run(["make", "-s", "-n", target, f"VENV={venv}", "-o", f"{venv}/.installed", f"ARGS={args}"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.strip().splitlines()
    assert len(out) == 1, out
    return shlex.split(out[0])


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_runs(command, workspace):
    kind, reason = classify(command)
    if kind == "skip":
        pytest.skip(reason)
    folder, model = workspace
    script, args = program(command.argv)
    if script == "make":  # make train / make test: their recipes, run on a tiny budget
        target = args[0]
        passed = dict(a.split("=", 1) for a in args[1:])
        if target == "test":  # the suite this test belongs to: collected, not run again
            env, recipe = split_env(make_recipe("test", "--collect-only -q tests/test_docs.py"))
            result = subprocess.run(recipe, capture_output=True, text=True, cwd=REPO, timeout=600,
                                    env={**os.environ, **env})
            assert result.returncode == 0, result.stdout[-3000:]
            return
        budget = " ".join(["--model", model, "--output_dir", f"{folder}/outputs/make_{target}", *TINY_BUDGET])
        env, recipe = split_env(make_recipe(target, f"{passed.get('ARGS', '')} {budget}"))
        result = run_process(recipe, {**command.env, **env}, folder)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    in_process = (Path(script).name in {"train_loop.py", "eval.py", "bench_speed.py"} and "--help" not in args
                  and "--multi_gpu" not in command.argv and "--num_processes" not in command.argv)
    argv = tiny(command, folder, model)
    if in_process:
        code, stderr = run_in_process(script, argv, folder)
    else:
        result = run_process(launcher_flags(command.argv) + [script] + argv, command.env, folder)
        code, stderr = result.returncode, result.stderr
    if kind == "hub":
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    else:
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("script", ["train_loop.py", "eval.py"])
def test_help_runs_in_a_fresh_process(script):
    """The first command a user types, as they type it."""
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--output_dir" in result.stdout or "--adapter_dir" in result.stdout
