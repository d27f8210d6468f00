"""The ``--device`` of ``sample`` and ``eval``: checked before any work."""

from __future__ import annotations

from ldm_smd.errors import UsageError


def resolve_device(device: str | None, *, option: str = "--device") -> str:
    """``device`` checked against this machine (``None``: CUDA when available, else CPU).

    An unknown device string, or a CUDA / MPS device this machine does not have, is a
    :class:`UsageError` naming ``option``.
    """
    import torch

    if device is None or device == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            f"{option} {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{option} {device}: torch sees no CUDA GPU on this machine "
                "(torch.cuda.is_available() is False); use --device cpu or leave it out"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"{option} {device}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"{option} {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise UsageError(f"{option} {device}: only cpu, cuda[:N] and mps are supported")
    return str(parsed)
