"""Run folders: what a run writes there, refusing to overwrite one by accident, cleaning up after
a failed start, and finding the checkpoint to resume."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.errors import OutputError

LAST = "last.ckpt"
#: what a run writes into its run_dir (and all that ``overwrite`` removes)
RUN_ENTRIES = ("config.yaml", "checkpoints", "logs", "samples", "reconstructions")


def resolve_resume(resume: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` from a run folder or a checkpoint path."""
    resume = Path(resume)
    if resume.is_dir():
        ckpt = resume / "checkpoints" / LAST
        if not ckpt.is_file():
            raise CheckpointError(f"--resume {resume}: no checkpoint at {ckpt}")
        return resume, ckpt
    if resume.is_file():
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        return run_dir, resume
    raise CheckpointError(f"--resume {resume}: no such run folder or checkpoint")


def existing_run(run_dir: Path) -> list[str]:
    """The entries of :data:`RUN_ENTRIES` that ``run_dir`` already holds (empty folders aside)."""
    found = []
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def describe_run(run_dir: Path) -> str:
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (
        run_dir / "checkpoints").is_dir() else []
    steps = [int(m.group(1)) for p in ckpts if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name))]
    if not ckpts:
        return "no checkpoint yet"
    latest = f", latest step={max(steps)}.ckpt" if steps else ""
    return f"{len(ckpts)} checkpoint(s){latest}"


def refuse_existing_run(run_dir: Path, entries: list[str]) -> OutputError:
    return OutputError(
        f"run_dir {run_dir} already holds a run ({', '.join(entries)}; {describe_run(run_dir)})"
        f" and nothing in it was changed: continue it with `ldm-smd train --resume {run_dir}`, "
        f"start it over with --overwrite (deletes {', '.join(entries)}), or give a new "
        f"run_dir=..."
    )


def remove_previous_run(run_dir: Path, entries: list[str]) -> None:
    for name in entries:
        path = run_dir / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    print(f"[ldm-smd] --overwrite: deleted the previous run in {run_dir} ({', '.join(entries)})")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written checkpoint temporaries a killed run left behind."""
    for tmp in sorted(folder.glob(".*.tmp")):
        print(f"[ldm-smd] removing incomplete checkpoint write {tmp}")
        tmp.unlink(missing_ok=True)


def remove_failed_start(run_dir: Path, before: set[Path], *, made_run_dir: bool) -> None:
    """A new run that failed before its first step (say, an undecodable first batch) leaves
    nothing behind: what this attempt wrote of :data:`RUN_ENTRIES` is removed, and the run
    folder too when this attempt made it, so the same command can simply be run again."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path in before or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if made_run_dir and not any(run_dir.iterdir()):
        run_dir.rmdir()


def remove_new_empty_folders(run_dir: Path, before: set[Path]) -> None:
    """After a failed start, remove the (empty) folders this attempt made, e.g. a logger's."""
    for path in sorted(run_dir.rglob("*"), reverse=True):
        if path.is_dir() and path not in before and not any(path.iterdir()):
            path.rmdir()


def kept(run_dir: Path) -> str:
    last = run_dir / "checkpoints" / LAST
    if last.is_file():
        return (f"the last complete checkpoint {last} is kept; resume with "
                f"`ldm-smd train --resume {run_dir}`")
    return "no checkpoint of this run was written yet"
