"""Grid files: their validation, the cells they define, stable cell ids, and selecting cells.

A grid file (YAML, ``grids/<name>.yaml``)::

    description: what the grid is for
    methods: [bn, bnrs, brn]          # trained together, in lockstep, in every cell
    settings: {epochs: 2, lr: 0.001}  # shared by every cell (any training-config key)
    axes:                             # the cells are the cross product of the axes
      dataset: [digits]               # an axis named after a config key lists its values
      seed: [0, 1, 2]
      batching:                       # any other name is a zipped axis: each entry sets several keys
        - {batch_size: 2, sampler: iid}
        - {batch_size: 16, sampler: noniid, classes_per_batch: 2}
    slurm: {partition: gpu, gpus_per_task: 1}   # optional, for --executor slurm
    stack_seeds: true                 # optional: the cells that differ only in seed train as one model
    reuse: [mechanism]                # optional: a cell that trains exactly what a cell of one of these grids
                                      # trains is not trained again; its results are copied from there

Every cell gets a stable id from its resolved configuration. Running cells is :mod:`bnlib.runner`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import paths, train

TOP_KEYS = {"description", "methods", "settings", "axes", "slurm", "stack_seeds", "reuse"}
CONFIG_KEYS = {f for f in train.Config.__dataclass_fields__}


class GridError(ValueError):
    """A grid file that cannot run; the message names the file and the key."""


@dataclass
class Cell:
    id: str
    parameters: dict  # training-config keys only
    # another cell that trains exactly the same models: this cell is not executed, its results are copied from
    # that one. A cell id of this grid (e.g. 50 steps at batch 128 and 6,400 samples at batch 128), or
    # ``<grid>/<cell id>`` for a cell of a grid named under ``reuse``
    same_as: str | None = None

    def config(self) -> train.Config:
        return train.Config.from_dict(self.parameters)

    @property
    def reused(self) -> tuple[str, str] | None:
        """(grid, cell id) when this cell's results come from another grid's cell, else None."""
        if self.same_as is None or "/" not in self.same_as:
            return None
        other, _, cid = self.same_as.partition("/")
        return other, cid


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    cells: list[Cell]
    slurm: dict = field(default_factory=dict)
    stack_seeds: bool = False  # run the cells that differ only in seed as one stacked model


def resolve(grid: str | Path) -> Path:
    """A grid by name (``grids/<name>.yaml``) or by path."""
    path = Path(grid)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise GridError(f"grid file {path} does not exist")
        return path
    path = paths.GRIDS / f"{grid}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in paths.GRIDS.glob("*.yaml")))
        raise GridError(f"no grid named {grid!r}: {path} does not exist (known grids: {known})")
    return path


LOCAL_KEYS = train.LOCAL_KEYS  # where a cell runs, not what it computes: left out of the cell id
# Keys added after grids were run, left out of the id while at the value that reproduces the earlier
# results (adding an option must not orphan finished cells); any other value is hashed as usual.
ID_NEUTRAL = {
    "eval_batch_stats": False,
    "recompute_evals": "all",
    "compile": "off",
    "trace_every": None,
    "lr_schedule": "constant",
    "lr_drop_at": 2 / 3,
    "eval_batch_composition": "iid",
}


def _resolved(config: train.Config) -> dict:
    """Every setting of a cell, defaults included, less the ones about where it runs."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in LOCAL_KEYS}


def cell_id(parameters: dict) -> str:
    """Readable prefix + hash of the full resolved configuration (``train.Config``'s defaults included, so
    changing a default gives new cells instead of silently counting old results as done); stable across
    runs and machines."""
    resolved = {
        k: v
        for k, v in _resolved(train.Config.from_dict(parameters)).items()
        if not (k in ID_NEUTRAL and v == ID_NEUTRAL[k])
    }
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
    p = parameters
    prefix = f"{p.get('dataset', 'digits')}-b{p.get('batch_size', 16)}-{p.get('sampler', 'iid')}"
    if p.get("norm_placement", "all") != "all":
        prefix += f"-{p['norm_placement']}"
    return f"{prefix}-s{p.get('seed', 0)}-{digest}"


def training_key(parameters: dict) -> str:
    """What a cell trains: its resolved configuration with the budget as a number of steps, so two cells
    whose budgets name the same steps differently (``steps: 50`` and ``samples: 6400`` at batch 128) share
    it. Budgets in epochs depend on the dataset's size and are kept as given."""
    config = train.Config.from_dict(parameters)
    resolved = _resolved(config)
    if config.epochs is None:
        resolved.update(steps=train.total_steps(config, 0), samples=None)
    return json.dumps(resolved, sort_keys=True, separators=(",", ":"))


def parse_assignments(items: list[str], option: str = "--set") -> dict:
    """``KEY=VALUE`` items (of ``--set`` or ``--only``) as a mapping, VALUE read as YAML (``lr=3e-4``,
    ``recompute=false``, ``batch_size=2``); KEY must be a training-config key."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in CONFIG_KEYS:
            raise GridError(f"{option} {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(CONFIG_KEYS))}")
        out[key] = yaml.safe_load(raw)
    return out


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as a settings mapping."""
    return parse_assignments(items, "--set")


def load(grid: str | Path, overrides: dict | None = None, _loading: frozenset = frozenset()) -> Grid:
    """Read and check a grid file; every cell is validated before anything runs. ``overrides`` (from
    ``--set``) replace a setting in every cell, axes included, so the cell ids follow the values that run,
    and name the grid ``<grid>+KEY=VALUE``: its results go to their own folder."""
    path = resolve(grid)
    if path.resolve() in _loading:
        raise GridError(
            f"{path}: 'reuse' names grids that reuse each other in a circle; one of them must train its cells"
        )
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise GridError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))}"
        )
    settings = spec.get("settings") or {}
    axes = spec.get("axes") or {}
    if not isinstance(settings, dict) or not isinstance(axes, dict):
        raise GridError(f"{path}: 'settings' and 'axes' must be mappings")
    for key in settings:
        if key not in CONFIG_KEYS or key == "methods":
            raise GridError(
                f"{path}: settings: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS - {'methods'}))}"
            )
    choices = []
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: axes.{axis} must be a non-empty list")
        if axis in CONFIG_KEYS:
            choices.append([{axis: v} for v in values])
            continue
        for i, entry in enumerate(values):
            if not isinstance(entry, dict):
                raise GridError(
                    f"{path}: axes.{axis}: {axis!r} is not a config key, so it must list mappings of config keys "
                    f"(a zipped axis); entry {i} is {entry!r}. Config keys: {', '.join(sorted(CONFIG_KEYS))}"
                )
            for key in entry:
                if key not in CONFIG_KEYS:
                    raise GridError(
                        f"{path}: axes.{axis}[{i}]: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS))}"
                    )
        choices.append(values)
    methods = spec.get("methods")
    if methods is not None and not isinstance(methods, list):
        raise GridError(f"{path}: 'methods' must be a list of method ids")
    cells, seen = [], set()
    for combo in itertools.product(*choices):
        params = dict(settings)
        if methods is not None:
            params["methods"] = list(methods)
        for part in combo:
            params.update(part)
        params.update(overrides or {})
        try:
            config = train.Config.from_dict(params, source=str(path))
            train.validate(config)
        except (train.ConfigError, TypeError) as err:
            raise GridError(f"{path}: cell {params}: {err}") from None
        params = {k: getattr(config, k) for k in params}  # typed: lr "1e-3" (YAML 1.1) is the float 0.001
        cid = cell_id(params)
        if cid not in seen:
            seen.add(cid)
            cells.append(Cell(cid, params))
    first_of: dict[str, str] = {}
    for cell in cells:  # the first cell of each training runs; later ones take its results
        key = training_key(cell.parameters)
        if key in first_of:
            cell.same_as = first_of[key]
        else:
            first_of[key] = cell.id
    _reuse(path, spec.get("reuse"), cells, _loading | {path.resolve()})
    slurm = spec.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise GridError(f"{path}: 'slurm' must be a mapping")
    # an overridden grid keeps its results apart (results/<grid>+lr=0.0003/): aggregation never mixes them
    typed = cells[0].parameters if cells else {}
    name = path.stem + "".join(
        f"+{k}={json.dumps(typed.get(k, v), separators=(',', ':')).strip(chr(34))}"
        for k, v in sorted((overrides or {}).items())
    )
    stack_seeds = spec.get("stack_seeds", False)
    if not isinstance(stack_seeds, bool):
        raise GridError(f"{path}: 'stack_seeds' must be true or false, not {stack_seeds!r}")
    return Grid(name, path, spec.get("description", ""), cells, slurm, stack_seeds)


def _reuse(path: Path, names, cells: list[Cell], loading: frozenset) -> None:
    """Point every cell that trains exactly what a cell of a grid named under ``reuse`` trains (the same
    training key: budgets, traces and the compiled path included) at that cell, ``<grid>/<cell id>``."""
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise GridError(f"{path}: 'reuse' must be a list of grid names, e.g. [mechanism]")
    for name in names:
        if resolve(name).resolve() == path.resolve():
            raise GridError(f"{path}: 'reuse' names the grid itself ({name!r}); its own twins are found without it")
        other = load(name, _loading=loading)  # a missing or bad grid file is an error naming it
        trained = {training_key(c.parameters): c.id for c in other.cells if c.same_as is None}
        for cell in cells:
            if cell.same_as is None and training_key(cell.parameters) in trained:
                cell.same_as = f"{other.name}/{trained[training_key(cell.parameters)]}"


def select(grid: Grid, only: list[str]) -> Grid:
    """The grid restricted to cells matching every ``KEY=VALUE`` (VALUE read as YAML: ``batch_size=2``)."""
    keep = grid.cells
    for key, value in parse_assignments(only, "--only").items():
        keep = [c for c in keep if getattr(c.config(), key) == value]
    if not keep:
        raise GridError(f"{grid.path}: no cell matches {' and '.join(only)}")
    kept = {c.id for c in keep}
    # a selected cell whose twin (in this grid) is not selected trains itself; another grid's cell stays its source
    keep = [
        c if c.same_as in kept or c.same_as is None or c.reused else dataclasses.replace(c, same_as=None) for c in keep
    ]
    return dataclasses.replace(grid, cells=keep)


def condition_key(cell: Cell) -> str:
    """A cell's resolved configuration less its seed: the cells sharing it can be stacked."""
    key = {k: v for k, v in _resolved(cell.config()).items() if k != "seed"}
    return json.dumps(key, sort_keys=True, default=str)
