"""Run folders: what a run writes there, refusing to overwrite one by accident, cleaning up after
a failed start, and finding the checkpoint to resume (the newest one that loads)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.errors import OutputError

LAST = "last.ckpt"
#: what a run writes into its run_dir (and all that ``overwrite`` removes)
RUN_ENTRIES = ("config.yaml", "checkpoints", "logs", "samples", "reconstructions")


def resume_target(resume: str | Path) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint)`` of ``--resume``: a run folder (its checkpoint is chosen under
    the folder's lock, :func:`newest_checkpoint`; ``None`` here) or a checkpoint file."""
    resume = Path(resume)
    if resume.is_dir():
        return resume, None
    if resume.is_file():
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        return run_dir, resume
    raise CheckpointError(f"--resume {resume}: no such run folder or checkpoint")


def _step_files(folder: Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of the ``step=N.ckpt`` files in ``folder``, highest ``N`` first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step=*.ckpt")
             if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name)) and p.is_file()]
    return sorted(found, reverse=True)


def _complete_step(path: Path) -> int:
    """The step a checkpoint was written at; :class:`CheckpointError` when it does not load."""
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return int(ckpt.get("global_step", -1))


def newest_checkpoint(run_dir: Path) -> tuple[Path, str]:
    """The newest checkpoint of ``run_dir`` that loads, and why it is not ``last.ckpt`` (empty
    when it is): ``last.ckpt`` unless it is missing or damaged, or a ``step=N.ckpt`` beside it
    is newer (a run stopped between writing the two). Raises :class:`CheckpointError` naming
    what was looked at when no checkpoint loads."""
    folder = run_dir / "checkpoints"
    last = folder / LAST
    problems: list[str] = []
    last_step = -1
    if last.is_file():
        try:
            last_step = _complete_step(last)
        except CheckpointError as exc:
            problems.append(f"{LAST} is damaged ({exc})")
    else:
        cut = sorted(p.name for p in folder.glob(f".{LAST}.*.tmp")) if folder.is_dir() else []
        problems.append(f"{LAST} is missing" + (f" (its write was cut off: {cut[0]})" if cut
                                                 else ""))
    for step, path in _step_files(folder) if folder.is_dir() else []:
        if step <= last_step:
            break
        try:
            _complete_step(path)
        except CheckpointError as exc:
            problems.append(f"{path.name} is damaged ({exc})")
            continue
        if last_step >= 0:
            problems.append(f"{path.name} is newer than {LAST} (step {last_step})")
        return path, "; ".join(problems)
    if last_step >= 0:
        return last, ""
    raise CheckpointError(
        f"--resume {run_dir}: no complete checkpoint in {folder} ({'; '.join(problems)}"
        f"{'' if _step_files(folder) or not folder.is_dir() else '; no step=N.ckpt either'})"
    )


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint file (complete or not)."""
    return bool(_checkpoint_files(run_dir))


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir`` (quoted for a shell)."""
    return f"ldm-smd train --resume {shlex.quote(str(run_dir))}"


def existing_run(run_dir: Path) -> list[str]:
    """The entries of :data:`RUN_ENTRIES` that ``run_dir`` already holds (empty folders aside)."""
    found = []
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def _checkpoint_files(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else []


def describe_run(run_dir: Path) -> str:
    ckpts = _checkpoint_files(run_dir)
    if not ckpts:
        return "no checkpoint yet"
    steps = _step_files(run_dir / "checkpoints")
    latest = f", latest {steps[0][1].name}" if steps else ""
    return f"{len(ckpts)} checkpoint(s){latest}"


def refuse_existing_run(run_dir: Path, entries: list[str]) -> OutputError:
    again = (f"continue it with `{resume_command(run_dir)}`, " if has_checkpoint(run_dir)
             else "it has no checkpoint to continue from: ")
    return OutputError(
        f"run_dir {run_dir} already holds a run ({', '.join(entries)}; {describe_run(run_dir)})"
        f" and nothing in it was changed: {again}start it over with --overwrite (deletes "
        f"{', '.join(entries)}), or give a new run_dir=..."
    )


def run_to_replace(run_dir: Path, *, overwrite: bool, stale: object | None
                   ) -> tuple[list[str], str]:
    """What a new run into ``run_dir`` deletes once its checks passed, and why (the start of
    the line that says so): nothing in a new folder; the earlier run with ``overwrite``; the
    entries of an attempt whose process died before its first checkpoint (``stale``: the lock
    owner found gone, :attr:`ldm_smd.locks.FolderLock.stale`), which nothing could resume.
    Any other earlier run is refused (:func:`refuse_existing_run`)."""
    previous = existing_run(run_dir)
    if not previous or overwrite:
        return previous, "--overwrite"
    if stale is not None and not has_checkpoint(run_dir):
        return previous, (f"the attempt of pid {getattr(stale, 'pid', '?')} here ended before "
                          "its first checkpoint")
    raise refuse_existing_run(run_dir, previous)


def remove_previous_run(run_dir: Path, entries: list[str], *, why: str = "--overwrite") -> None:
    """Delete ``entries`` of ``run_dir`` and say what was deleted (``why`` starts the line)."""
    what = f"{', '.join(entries)}; {describe_run(run_dir)}"
    for name in entries:
        path = run_dir / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    print(f"[ldm-smd] {why}: deleted the previous run in {run_dir} ({what})")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written checkpoint temporaries a killed run left behind."""
    for tmp in sorted(folder.glob(".*.tmp")):
        print(f"[ldm-smd] removing incomplete checkpoint write {tmp}")
        tmp.unlink(missing_ok=True)


def remove_failed_start(run_dir: Path, before: set[Path]) -> None:
    """A new run that stopped before its first checkpoint (an undecodable first batch, a NaN)
    leaves nothing behind: what this attempt wrote of :data:`RUN_ENTRIES` is removed (the run
    folder itself, when this command made it, goes with its lock), so the same command can
    simply be run again."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path in before or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def clean_up_after_failure(run_dir: Path, before: set[Path], *, new_run: bool) -> str:
    """After a run stopped by an error or a second Ctrl-C, say what is kept. A new run that
    wrote no checkpoint leaves nothing of its own (so the same command runs again); otherwise
    only the folders it made that stayed empty go."""
    if not run_dir.is_dir():
        return "nothing was written"
    if new_run and not has_checkpoint(run_dir):
        remove_failed_start(run_dir, before)
        return ("no checkpoint had been written, so nothing of this attempt was kept: the same "
                "command starts it again")
    remove_new_empty_folders(run_dir, before)
    return kept(run_dir)


def remove_new_empty_folders(run_dir: Path, before: set[Path]) -> None:
    """After a failed start, remove the (empty) folders this attempt made, e.g. a logger's."""
    for path in sorted(run_dir.rglob("*"), reverse=True):
        if path.is_dir() and path not in before and not any(path.iterdir()):
            path.rmdir()


def kept(run_dir: Path) -> str:
    """What a stopped run leaves to continue from, and the command that continues it."""
    last = run_dir / "checkpoints" / LAST
    steps = _step_files(run_dir / "checkpoints") if last.parent.is_dir() else []
    ckpt = last if last.is_file() else (steps[0][1] if steps else None)
    if ckpt is not None:
        return (f"the last complete checkpoint {ckpt} is kept; resume with "
                f"`{resume_command(run_dir)}`")
    return "no checkpoint of this run was written yet"


def remove_new_logs(run_dir: Path, before: set[Path]) -> None:
    """Remove what this session made under ``logs/`` (a resume's ``logs/resume-K``: hparams,
    no rows) when it trained nothing."""
    logs = run_dir / "logs"
    new = [p for p in set(run_dir.rglob("*")) - before if logs == p or logs in p.parents]
    for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()
