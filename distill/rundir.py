"""The run directory: everything a run writes, written so that a kill at any moment loses nothing.

Layout (each phase adds its own sub-folder):
    config.json      resolved configs, by phase           manifest.json  versions, hashes, seeds
    ledger.json      device-hours per phase               metrics.jsonl  one JSON object per line
    teacher_data/    parquet shards (offpolicy.generate)  offpolicy/, onpolicy/  checkpoints
Files are replaced atomically (write a temporary file, fsync, rename); metrics.jsonl is only ever
appended whole lines, and a torn last line from a kill is dropped on read.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.errors import DistillError


def prepare(run_dir: Path) -> Path:
    """Create `run_dir` (and parents) and prove it writable, or say how to fix it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A probe of this process's own: every rank of a job prepares the same (shared) folder,
        # and one fixed name let one rank unlink the probe another was about to unlink.
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DistillError(
            f"cannot write to run directory {run_dir} ({e.strerror}): choose another --run-dir "
            "or fix its permissions"
        ) from None
    return run_dir


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # The old file (if any) is untouched: the write went to the temporary file only.
            raise DistillError(
                f"no space left on the device writing {path}: free space (or raise the quota) "
                "and rerun the same command; files already written are intact and reused"
            ) from None
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`; `default` (when given) if the file does not exist."""
    if default is not None and not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path} is not valid JSON ({e}); delete it or restore it") from None


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able values (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def record_config(
    run_dir: Path, phase: str, config: Any, force: bool = False, write: bool = True
) -> None:
    """Write `phase`'s resolved config into config.json; refuse a changed one unless `force`.

    `write=False` (a dry run) only refuses.

    A rerun into the same directory resumes, so it must mean the same run: otherwise finished
    shards or checkpoints from the old config would be mixed with new ones.
    """
    path = run_dir / "config.json"
    configs = read_json(path, default={})
    new = config_dict(config)
    old = configs.get(phase)
    # A field added to the config after `old` was recorded, left at its default, is no change:
    # runs recorded by an older version resume.
    added = {k for k, v in _defaults(config).items() if k not in (old or {}) and new.get(k) == v}
    # The run dir itself is no part of a run's identity: a moved or copied run resumes.
    changed = sorted(
        k
        for k in set(old or {}) | set(new)
        if k != "run_dir" and k not in added and (old or {}).get(k) != new.get(k)
    )
    if old is not None and changed and not force:
        raise DistillError(
            f"{run_dir} already holds a {phase} run with a different config "
            f"(changed: {', '.join(changed)}): use a new --run-dir, or --force to overwrite"
        )
    if write:
        configs[phase] = new
        atomic_write_json(path, configs)


def _defaults(config: Any) -> dict[str, Any]:
    """The JSON form of each field's default (as `config_dict` writes it), where it has one."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line. A single write of a whole line; a kill can tear only the last one."""
    line = json.dumps(dict(record), default=float) + "\n"
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line)
        f.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed writer
    return out
