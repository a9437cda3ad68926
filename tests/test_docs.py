"""The documentation runs: every Python block of ``docs/`` is executed (the blocks of one page in
order, in one namespace, in a temporary directory), every ``shardml train`` / ``shardml plan``
command line of the docs and of the notebooks' text is parsed and validated as the command line
would (nothing trained), every YAML config loads and validates, relative links resolve, and the
API reference is what ``docs/make_api.py`` writes from the current docstrings.
"""

import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.name != "api.md")  # api.md is generated (checked below)
# Pages whose Python blocks are a user's test suite rather than a script: run, as a suite, elsewhere.
RUN_ELSEWHERE = {"howto-test-sharding.md": "test_testing_plugin.py"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LANGUAGES = {"python", "bash", "yaml", "ini", "toml", "text"}
INLINE_COMMAND = re.compile(r"`(shardml (?:train|plan) [^`]+)`")


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: pathlib.Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


def _notebook_markdown() -> list[tuple[str, str]]:
    """(notebook, text) of every markdown cell of colab/*.py (jupytext percent format)."""
    import jupytext

    cells = []
    for path in sorted((ROOT / "colab").glob("*.py")):
        if path.stem == "sync":
            continue
        for cell in jupytext.read(path, fmt="py:percent").cells:
            if cell.cell_type == "markdown":
                cells.append((_name(path), cell.source))
    return cells


def _command_lines() -> list[tuple[str, str]]:
    """(where, command) of every shardml train/plan line in docs' bash blocks and inline code, and
    in the notebooks' markdown."""
    texts = [(_name(p), p.read_text()) for p in PAGES] + _notebook_markdown()
    found = []
    for where, text in texts:
        for lang, code in FENCE.findall(text):
            if lang == "bash":
                found += [(where, line.strip()) for line in code.splitlines() if line.strip().startswith("shardml ")]
        outside = FENCE.sub("", text)
        found += [(where, " ".join(match.split())) for match in INLINE_COMMAND.findall(outside)]
    return found


def test_every_block_names_a_known_language():
    for page in PAGES:
        for lang, _ in FENCE.findall(page.read_text()):
            assert lang in LANGUAGES, f"{_name(page)}: a ```{lang or '(none)'} block; use one of {sorted(LANGUAGES)}"


def test_pages_run_elsewhere_are_run_there():
    for page, test in RUN_ELSEWHERE.items():
        assert (DOCS / page).exists(), f"docs/{page} is gone: remove it from RUN_ELSEWHERE"
        assert f'"{page}"' in (ROOT / "tests" / test).read_text(), f"tests/{test} no longer runs docs/{page}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python") and p.name not in RUN_ELSEWHERE], ids=_name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out_dir="runs/..." lands here
    scope: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page, "python")):
        exec(compile(code, f"{_name(page)} (python block {i + 1})", "exec"), scope)  # noqa: S102 - the docs' own code


def _named_configs(directory: pathlib.Path) -> dict[str, str]:
    """The docs' YAML blocks that open with ``# NAME.yaml``, written into ``directory``."""
    named = {}
    for page in PAGES:
        for code in blocks(page, "yaml"):
            match = re.match(r"#\s*([\w.-]+\.ya?ml)\b", code)
            if match:
                (directory / match.group(1)).write_text(code)
                named[match.group(1)] = str(directory / match.group(1))
    return named


def test_shardml_command_lines_are_valid(monkeypatch, tmp_path):
    """Parsed by the command line's own parser and validated for the device count they name
    (default 8); ``--compare`` layouts and ``--device-memory`` sizes too. Nothing is compiled. A
    config file the docs show (a YAML block opening with ``# NAME.yaml``) stands for NAME.yaml."""
    from shardml.analysis.plan import parse_bytes
    from shardml.run.cli import _arguments
    from shardml.run.config import load_config, validate
    from shardml.run.planning import layout_config

    monkeypatch.chdir(ROOT)  # configs/digits.yaml is relative to the repository
    shown = _named_configs(tmp_path)
    commands = _command_lines()
    assert len(commands) >= 10, commands
    for where, command in commands:
        words = shlex.split(command.split(" #")[0])
        try:
            args, preset, overrides = _arguments(words[1:])
            assert args.command in ("train", "plan"), args.command
            devices = args.cpu_devices or 8
            cfg = load_config(shown.get(preset, preset) or "default", overrides)
            validate(cfg, n_devices=devices)
            if args.command == "plan":
                if getattr(args, "device_memory", None) is not None:
                    parse_bytes(args.device_memory)
                for layout in getattr(args, "compare", None) or []:
                    validate(layout_config(cfg, layout), n_devices=devices)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure is reported with the line
            pytest.fail(f"{where}: `{command}` is not a valid command: {err!r}")


def test_config_files_load(tmp_path):
    """YAML blocks that are shardml configs (their keys are config sections) load and validate;
    other YAML, INI and TOML blocks parse."""
    import configparser
    import dataclasses
    import tomllib

    import yaml

    from shardml.run.config import Config, load_config, validate

    sections = {f.name for f in dataclasses.fields(Config)}
    configs = 0
    for page in PAGES:
        for i, code in enumerate(blocks(page, "yaml")):
            data = yaml.safe_load(code)
            if not (isinstance(data, dict) and set(data) <= sections):
                continue
            configs += 1
            path = tmp_path / f"{page.stem}-{i}.yaml"
            path.write_text(code)
            try:
                validate(load_config(str(path), []), n_devices=8)
            except Exception as err:  # noqa: BLE001 - any failure is reported with the block
                pytest.fail(f"{_name(page)}: the YAML config does not load: {err!r}\n{code}")
        for code in blocks(page, "ini"):
            configparser.ConfigParser().read_string(code)
        for code in blocks(page, "toml"):
            tomllib.loads(code)
    assert configs, "the how-tos show a config file"


def test_relative_links_resolve():
    pages = PAGES + [ROOT / "colab" / "README.md", ROOT / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            assert (page.parent / target).exists(), f"{_name(page)} links to {target}, which does not exist"


def _make_api():
    spec = importlib.util.spec_from_file_location("docs_make_api", DOCS / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    text = _make_api().render()
    committed = (DOCS / "api.md").read_text()
    if text != committed:
        ours, theirs = text.splitlines(), committed.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        pytest.fail(f"docs/api.md is out of date from line {first + 1} "
                    f"(now: {ours[first] if first < len(ours) else '<end>'!r}); run: python docs/make_api.py")


def test_api_reference_documents_every_public_name():
    import shardml

    text = (DOCS / "api.md").read_text()
    missing = [name for name in shardml.__all__ if f"### `shardml.{name}`" not in text]
    assert not missing, f"docs/api.md lacks {missing}; run: python docs/make_api.py"
    undocumented = re.findall(r"### `shardml\.(\w+)`\n\n```text\n[^`]*```\n\n\(no docstring\)", text)
    print("public names without a docstring:", undocumented)


RULES_TABLE = re.compile(r"<!-- the default rules: .*? -->\n(.*?)<!-- end of the default rules -->", re.DOTALL)


def _mesh_axes_cell(axes) -> str:
    """How the table writes a rule's mesh axes."""
    if axes is None or axes == ():
        return "replicated"
    return " × ".join(f"`{axis}`" for axis in ((axes,) if isinstance(axes, str) else axes))


def test_own_model_rules_table_is_the_default_rules():
    """docs/howto-own-model.md's table of logical names is what shardml.Rules.default() says: every
    name, in the rules' order, with its mesh axes."""
    import shardml

    match = RULES_TABLE.search((DOCS / "howto-own-model.md").read_text())
    assert match, "docs/howto-own-model.md lost its table of the default rules"
    documented = re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", match.group(1), re.MULTILINE)
    expected = [(name, _mesh_axes_cell(axes)) for name, axes in shardml.Rules.default().table]
    rows = "\n".join(f"| `{name}` | {cell} | ... |" for name, cell in expected)
    assert documented == expected, f"docs/howto-own-model.md's rules table is out of date; its rows should be:\n{rows}"
