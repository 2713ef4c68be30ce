"""Checkpoints inside a cell: a cell killed mid-run resumes where its last checkpoint left it, to the same numbers.

A checkpoint holds the state of the whole lockstep run (every method's model, optimiser and records, the
random state, the step reached) under a key: the training settings (not where the cell runs), the seeds and
the training code's fingerprint. A checkpoint of other settings or code is ignored, never resumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..provenance import TRAINING_SHA256
from ..record import atomic_write


def key(config, seeds: list[int], local_keys: tuple[str, ...]) -> dict:
    """What a checkpoint must match to be resumed: the training settings less ``local_keys`` (where the cell
    runs), the seeds and the training code."""
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in local_keys},
        "seeds": list(seeds),
        "training_code_sha256": TRAINING_SHA256,
    }


def save(path: Path, state: dict) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact (not flushed to the disk:
    with ``checkpoint_minutes: 0`` it is written every step; an unreadable one is ignored when loaded)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp), durable=False)


def load(path: Path, expected_key: dict) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this configuration, seeds and code (``expected_key``), else
    None (with the reason printed, and the file left for the next run to overwrite)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint costs the time since the start, not the cell
        print(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); starting from step 0")
        return None
    if state.get("key") != expected_key:
        print(f"checkpoint {path} was written for other settings or training code; starting from step 0")
        return None
    return state
