"""The project's own set-up files agree with each other and with the README."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

from bnlib import cli, runner

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


CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def _check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_publishing_workflow_is_valid_and_builds_what_the_tests_build(tmp_path):
    """The workflow passes SchemaStore's github-workflow schema (vendored in check-jsonschema, offline), runs
    the README's set-up and test command, builds with `bnlib book` (bnlib.paper.site.build, what tests/test_book.py
    builds) and deploys that folder to Pages."""
    path = ROOT / ".github" / "workflows" / "book.yml"
    done = _check("--builtin-schema", "vendor.github-workflows", path)
    assert done.returncode == 0, done.stdout + done.stderr
    flow = yaml.safe_load(path.read_text())
    steps = {job: flow["jobs"][job]["steps"] for job in flow["jobs"]}
    runs = {job: "\n".join(s.get("run", "") for s in st) for job, st in steps.items()}
    uses = {job: [s.get("uses", "") for s in st] for job, st in steps.items()}
    assert "bash scripts/setup.sh" in runs["build"] and "bash scripts/test.sh" in runs["tests"]
    book_line = next(line for line in runs["build"].splitlines() if "bnlib book" in line)
    args = cli.parser().parse_args(shlex.split(book_line.split("bnlib", 1)[1]))
    assert args.func is cli.cmd_book and not args.no_strict and args.grid == "study"
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses["build"])
    assert (
        next(s for s in steps["build"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))["with"]["path"]
        == "_build/html"
    )
    assert any(u.startswith("actions/deploy-pages@") for u in uses["deploy"]) and set(
        flow["jobs"]["deploy"]["needs"]
    ) == {"build", "tests"}
    broken = tmp_path / "broken.yml"
    broken.write_text(path.read_text().replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04", 1))
    assert _check("--builtin-schema", "vendor.github-workflows", broken).returncode != 0


def test_citation_file_is_valid_cff():
    """CITATION.cff against the Citation File Format 1.2.0 schema (vendored from cffconvert 2.0.0, whose
    own validator pins a jsonschema that conflicts with jupyter-book's)."""
    schema = ROOT / "tests" / "data" / "citation-file-format-1.2.0.schema.json"
    done = _check("--schemafile", schema, ROOT / "CITATION.cff")
    assert done.returncode == 0, done.stdout + done.stderr
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["authors"]


def test_an_invalid_citation_file_is_caught(tmp_path):
    schema = ROOT / "tests" / "data" / "citation-file-format-1.2.0.schema.json"
    bad = tmp_path / "CITATION.cff"
    bad.write_text((ROOT / "CITATION.cff").read_text().replace("cff-version: 1.2.0", "cff-version: one"))
    assert _check("--schemafile", schema, bad).returncode != 0


def test_binder_registers_the_kernel_the_cell_notebooks_name():
    import os

    import nbformat

    post = ROOT / "postBuild"
    assert os.access(post, os.X_OK), "Binder runs postBuild only when it is executable"
    kernel = nbformat.read(runner.NOTEBOOK, as_version=4).metadata["kernelspec"]["name"]
    assert kernel == runner.KERNEL and f"--name {kernel}" in post.read_text()
    assert "-e ." in (ROOT / "environment.yml").read_text()  # Binder installs bnlib itself from environment.yml
