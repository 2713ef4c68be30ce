"""The project's own set-up files agree with each other and with the README."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = sorted(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if p != "-e .") == wanted
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=3.10" and python == "python=3.11"


def test_constraints_pin_what_pyproject_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, rest = line.split("==", 1)
            pins[name.lower()] = rest.split(";")[0].strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, version = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", dep).groups()
        if "!=" in dep:  # the aarch64 torch pins are not in the x86_64 freeze
            continue
        assert pins.get(name.lower().replace("_", "-"), pins.get(name.lower())) == version, dep


def test_readme_quick_start_and_ci_use_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/main.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for folder in ("bnlib/", "grids/", "book/", "results/", "tests/", "scripts/"):
        assert f"`{folder}`" in readme, folder


def test_every_bnlib_command_line_in_the_docs_parses():
    """A command shown in the README or the book must be one the CLI accepts (options included)."""
    import shlex

    from bnlib import cli

    pattern = re.compile(r"bnlib ((?:run|status|aggregate|bench|book|verify)\b[^`#|)\n]*)")
    seen = 0
    for path in [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]:
        for match in pattern.finditer(path.read_text()):
            words = [w for w in shlex.split(match.group(1)) if not w.startswith("<")]
            words = [w.rstrip(".,;:") for w in words]
            if words[0] in ("run", "status", "aggregate", "verify") and (len(words) == 1 or words[1] == "GRID"):
                words = [words[0], "smoke", *words[2:]]  # prose that names the verb only: give it a grid
            args = cli.parser().parse_args(words)  # SystemExit (a failure) on any unknown option
            assert args.command == words[0], (path, match.group(0))
            seen += 1
    assert seen >= 20
