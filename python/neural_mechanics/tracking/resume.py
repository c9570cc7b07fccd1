"""A tracker's state for checkpoints: ``Tracker.state_dict()`` / ``load_state_dict()``.

The state is what ``torch.load(weights_only=True)`` reads: a dict of strings, numbers, lists
and tensors. It holds

- ``"meta"``: one JSON string: the format and version, the step, what the tracker tracks (the
  optimizer, ``every``, ``record_every``, each group's symmetry/layer/index and each tracked
  parameter's name and shape, the identity a resumed tracker must match), and the run's notes,
  regimes, paper notes, hyperparameters and info;
- ``"core"``: the native core's state (the clock, the held drive, every lane's theory state:
  src/tracking/snapshot.rs), one float64 tensor per entry;
- ``"rows"``: the run's recorded rows so far (``steps``, ``time`` and every column as tensors),
  or None with ``state_dict(rows=False)``.

A resumed run therefore holds the earlier rows too and continues them as if never stopped
(docs/tracking.md, "Resuming a run").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..run import COLUMNS, Run

FORMAT = "neural-mechanics tracker state"
VERSION = 1


def identity(tracker: Any) -> dict[str, Any]:
    """What a state must match to continue a run: optimizer, cadence, groups and parameters."""
    plan = tracker._plan
    return {
        "optimizer": type(tracker.optimizer).__name__,
        "every": tracker.every,
        "record_every": tracker.record_every,
        "groups": [f"{g.symmetry} {g.layer} #{getattr(g, 'index', '')}" for g in plan.groups],
        "parameters": [[n, list(plan.params[n].shape)] for n in plan.names],
    }


def export(tracker: Any, rows: bool) -> dict[str, Any]:
    import torch

    run: Run = tracker._run
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": tracker._step,
        "identity": identity(tracker),
        "notes": list(run.notes),
        "regimes": run.regimes,
        "paper_notes": [[k[0], k[1], v] for k, v in run.paper_notes.items()],
        "hyperparameters": run.hyperparameters,
        "no_grad_noted": sorted(tracker._path._no_grad_noted),
        "info": run.info,
    }
    try:
        text = json.dumps(meta, allow_nan=True)
    except TypeError:  # run.info holding something JSON cannot say: kept out of the state
        meta["info"] = {}
        text = json.dumps(meta, allow_nan=True)
    core = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in tracker._path.core.export_state().items()}
    return {"meta": text, "core": core, "rows": _rows(run) if rows else None}


def _rows(run: Run) -> dict[str, Any]:
    """The recorded rows (spilled chunks included, the final row of a closed run left out)."""
    import torch

    steps, time, cols = run.step_index, run.time_index, {c: run.array(c) for c in COLUMNS}
    if run.final is not None and len(steps):  # the final row is appended last, at close()
        steps, time, cols = steps[:-1], time[:-1], {c: v[:-1] for c, v in cols.items()}
    out = {"steps": torch.from_numpy(np.ascontiguousarray(steps, dtype=np.int64)), "time": torch.from_numpy(np.ascontiguousarray(time))}
    out.update({c: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for c, v in cols.items()})
    return out


def parse(state: Any) -> dict[str, Any]:
    """The state's meta after checking its layout (before the tracker knows its groups)."""
    if not isinstance(state, dict) or not {"meta", "core", "rows"} <= set(state):
        raise InvalidArgumentError("load_state_dict: not a tracker state (a dict with 'meta', 'core' and 'rows', from Tracker.state_dict())")
    try:
        meta = json.loads(state["meta"])
    except (TypeError, ValueError):
        raise InvalidArgumentError("load_state_dict: 'meta' is not the JSON text of a tracker state") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidArgumentError("load_state_dict: not a tracker state (format missing)")
    if meta.get("version") != VERSION:
        raise InvalidArgumentError(f"load_state_dict: version {meta.get('version')!r}; this tracker reads version {VERSION}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidArgumentError(f"load_state_dict: step must be an integer >= 0, got {step!r}")
    if not isinstance(state["core"], dict):
        raise InvalidArgumentError("load_state_dict: 'core' must be a dict of arrays")
    return meta


def apply(tracker: Any, state: dict[str, Any]) -> None:
    """Continue the run of ``state`` in ``tracker`` (set up, no step taken yet)."""
    meta = parse(state)
    mine = identity(tracker)
    theirs = meta.get("identity")
    if theirs != mine:
        diff = [k for k in mine if not isinstance(theirs, dict) or theirs.get(k) != mine[k]]
        raise InvalidArgumentError(
            "load_state_dict: the state was saved by a tracker of another model, optimizer or settings "
            f"(different: {', '.join(diff) or 'identity'}); resume with the same model, optimizer, every and record_every"
        )
    core: dict[str, list[float]] = {}
    for k, v in state["core"].items():
        try:
            core[str(k)] = [float(x) for x in np.asarray(v.cpu() if hasattr(v, "cpu") else v, dtype=np.float64).ravel()]
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"load_state_dict: core entry {k!r} is not an array of numbers") from None
    run: Run = tracker._run
    rows = state["rows"]
    restored = _check_rows(rows, len(run.groups)) if rows is not None else None
    tracker._path.core.import_state(core)  # checks every entry first: refused, nothing moved
    tracker._step = meta["step"]
    tracker._path._no_grad_noted = set(meta.get("no_grad_noted", []))
    setup_notes = [n for n in run.notes if n not in meta.get("notes", [])]
    run.notes[:] = list(meta.get("notes", [])) + setup_notes
    run.regimes.clear()
    run.regimes.update({str(k): list(v) for k, v in dict(meta.get("regimes", {})).items()})
    run.paper_notes.update({(a, b): c for a, b, c in meta.get("paper_notes", [])})
    run.hyperparameters = list(meta.get("hyperparameters", run.hyperparameters))
    run.info.update(dict(meta.get("info", {})))
    if restored is not None:
        steps, time, block = restored
        for i in range(len(steps)):
            run.append_row(int(steps[i]), float(time[i]), block[i])
    else:
        run.notes.append(f"resumed at step {meta['step']} without the earlier rows (state_dict(rows=False))")


def _check_rows(rows: Any, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, time, (rows, columns, groups) block) of a state's rows, shapes checked."""
    if not isinstance(rows, dict) or not {"steps", "time", *COLUMNS} <= set(rows):
        raise InvalidArgumentError(f"load_state_dict: 'rows' must hold steps, time and every column {COLUMNS}")

    def arr(k: str, dtype: Any) -> np.ndarray:
        v = rows[k]
        return np.asarray(v.cpu() if hasattr(v, "cpu") else v, dtype=dtype)

    steps, time = arr("steps", np.int64), arr("time", np.float64)
    n = len(steps)
    if steps.shape != (n,) or time.shape != (n,):
        raise InvalidArgumentError("load_state_dict: rows' steps and time must be 1-D and of one length")
    cols = [arr(c, np.float64) for c in COLUMNS]
    if any(c.shape != (n, groups) for c in cols):
        raise InvalidArgumentError(f"load_state_dict: every column of the rows must be ({n}, {groups}): (rows, groups of this tracker)")
    return steps, time, np.stack(cols, axis=1)
