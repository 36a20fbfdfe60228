"""The run folder every training command writes (DESIGN.md §7).

Layout of ``--out DIR``::

    DIR/config.resolved.yaml   the config after defaults and --set overrides
    DIR/metrics.jsonl          one JSON object per round (or epoch), each with an integer "step"
    DIR/report.json            the run's summary
    DIR/checkpoints/last.pt    the newest checkpoint
    DIR/checkpoints/previous.pt the one before it
    DIR/plots/*.png            accuracy and epsilon per round, a grid of pseudo-samples

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
crash or a kill at any moment leaves either the old or the new version of a file, never a mix.
``metrics.jsonl`` is the one file appended to; a record counts once its newline is written, and
:meth:`MetricsLog.truncate_after` drops the rounds a resumed run will redo, so no completed round
is lost or counted twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from fed_dfkd.errors import UserError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _atomic_write(
    path: PathLike,
    write: Callable[[IO[bytes]], object],
    *,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Call ``write`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    ``before_replace`` runs once the new content is safely on disk, just before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one file system.
    handle = tempfile.NamedTemporaryFile(
        mode="wb", dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # NamedTemporaryFile creates 0600; give the result the mode a plain open() would.
        os.chmod(temporary, 0o666 & ~_UMASK)
        if before_replace is not None:
            before_replace()
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; parent folders are created."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; parent folders are created."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``.

    Python's ``json`` would write them as the bare words ``NaN``/``Infinity``, which are not JSON
    and which other readers (jq, JavaScript, pandas with a strict parser) reject. ``None`` reads as
    "no value", which is what a diverged or not-yet-measured metric is. Dicts, lists and tuples are
    walked; float subclasses (numpy's float64) are converted to ``float``.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def _dumps(obj: Any, *, indent: int | None) -> str:
    # allow_nan=False: json_safe has removed them, anything left is a bug worth an error.
    return json.dumps(json_safe(obj), indent=indent, sort_keys=False, allow_nan=False,
                      ensure_ascii=False)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as standard JSON (indent 2, keys in insertion order) atomically.

    NaN and ±inf become ``null`` (see :func:`json_safe`), so the file is standard JSON.
    """
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically; parent folders are created."""
    import torch  # keeps `import fed_dfkd.runs` cheap for commands that never save tensors

    _atomic_write(path, lambda handle: torch.save(obj, handle))


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsLog:
    """An append-only JSON-lines file, one record per round or epoch.

    Each record is a JSON object with an integer ``"step"``. A line is committed once its newline
    is on disk: a last line without one is the remains of a write cut short by a crash, and is
    ignored by :meth:`records` (with a warning) and cut off before the next :meth:`append`.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, flushed and fsynced; NaN/inf are written as null."""
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record must be a dict, got {type(record).__name__}")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"a metrics record needs an integer 'step', got {step!r}")
        line = _dumps(record, indent=None) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        with open(self.path, "ab") as handle:
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[dict[str, Any]]:
        """Every committed record, in file order; ``[]`` if the file does not exist.

        Raises :class:`~fed_dfkd.errors.UserError` naming the file and line for a complete line
        that is not a JSON object with an integer ``"step"``.
        """
        try:
            text = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        # The piece after the last newline is "" for a clean file, or a torn line.
        torn = lines.pop()
        if torn.strip():
            logger.warning(
                "%s: ignoring an incomplete last line (%d bytes, no newline), "
                "probably from an interrupted run", self.path, len(torn.encode("utf-8")),
            )
        result = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            result.append(self._parse(line, number))
        return result

    def truncate_after(self, step: int) -> int:
        """Keep only the records with ``record["step"] <= step``; return how many were dropped.

        Used on ``--resume`` from a checkpoint taken after round ``step``: the rounds after it will
        be run again, so their old lines go. The file is rewritten atomically; a torn last line is
        dropped too.
        """
        if not self.path.exists():
            return 0
        records = self.records()
        kept = [record for record in records if record["step"] <= step]
        atomic_write_text(self.path, "".join(_dumps(record, indent=None) + "\n" for record in kept))
        dropped = len(records) - len(kept)
        if dropped:
            logger.info("%s: dropped %d record(s) after step %d", self.path, dropped, step)
        return dropped

    def _parse(self, line: str, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{self.path}, line {number}: not valid JSON ({error.msg}); the metrics log is "
                "damaged: fix or delete that line"
            ) from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise UserError(
                f"{self.path}, line {number}: expected a JSON object with an integer \"step\", "
                f"got {line[:80]!r}"
            )
        return record

    def _cut_torn_tail(self) -> None:
        # Without this, the next record would be glued onto the torn line and both would be lost.
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                if size == 0:
                    return
                handle.seek(size - 1)
                if handle.read(1) == b"\n":
                    return
                handle.seek(0)
                data = handle.read()
        except FileNotFoundError:
            return
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: cutting an incomplete last line (%d bytes) before appending",
                       self.path, len(data) - keep)
        with open(self.path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# The run folder


class RunDirectory:
    """The ``--out`` folder of one run; creating it creates ``checkpoints/`` and ``plots/``."""

    CONFIG_NAME = "config.resolved.yaml"
    METRICS_NAME = "metrics.jsonl"
    REPORT_NAME = "report.json"

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root}: exists and is not a folder")
        try:
            for folder in (self.root, self.checkpoints_dir, self.plots_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {self.root}: cannot create the run folder: "
                            f"{error.strerror or error}") from None
        self.metrics = MetricsLog(self.metrics_path)
        # A process killed mid-save (SIGKILL, power loss) leaves its temporary file behind;
        # checkpoints can be large, so do not let them pile up.
        for stale in self.checkpoints_dir.glob(".last.pt.*.tmp"):
            logger.info("removing %s, left by an interrupted checkpoint save", stale)
            stale.unlink(missing_ok=True)

    @property
    def config_path(self) -> Path:
        return self.root / self.CONFIG_NAME

    @property
    def metrics_path(self) -> Path:
        return self.root / self.METRICS_NAME

    @property
    def report_path(self) -> Path:
        return self.root / self.REPORT_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoints_dir / "last.pt"

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.checkpoints_dir / "previous.pt"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    def write_report(self, report: dict[str, Any]) -> None:
        """Write ``report.json`` (NaN/inf become null, see :func:`json_safe`)."""
        atomic_write_json(self.report_path, report)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Save ``state`` as ``last.pt``, keeping the one it replaces as ``previous.pt``.

        The new file is written and fsynced under a temporary name first; only then is ``last.pt``
        renamed to ``previous.pt`` and the new file renamed to ``last.pt``. A crash at any point
        leaves at least one complete checkpoint (between the two renames only ``previous.pt``,
        which :meth:`load_checkpoint` falls back to).
        """
        import torch

        def keep_previous() -> None:
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)

        _atomic_write(self.checkpoint_path, lambda handle: torch.save(state, handle),
                      before_replace=keep_previous)

    def load_checkpoint(self, *, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The newest checkpoint, or ``None`` if the run has none.

        Tensors are loaded onto ``map_location`` (CPU by default; the caller moves them). If
        ``last.pt`` is missing but ``previous.pt`` exists (a crash between the two renames of
        :meth:`save_checkpoint`), ``previous.pt`` is loaded. An unreadable file raises
        :class:`~fed_dfkd.errors.UserError` naming it; nothing is deleted.
        """
        path = self.checkpoint_path
        if not path.exists():
            if not self.previous_checkpoint_path.exists():
                return None
            path = self.previous_checkpoint_path
            logger.warning("%s is missing (interrupted save); resuming from %s",
                           self.checkpoint_path, path)
        return self._load(path, map_location=map_location)

    def _load(self, path: Path, *, map_location: Any) -> dict[str, Any]:
        import torch

        fallback = ""
        if path == self.checkpoint_path and self.previous_checkpoint_path.exists():
            fallback = (f"; the checkpoint before it is {self.previous_checkpoint_path}: move it "
                        f"to {self.checkpoint_path} to resume one round earlier")
        try:
            # weights_only=False: a checkpoint holds optimizer states, accountant histories and RNG
            # states, not only tensors, and it is a file this program wrote into the user's own
            # run folder, so unpickling it trusts nothing the user does not already run. Never
            # load a file received from a peer this way.
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any failure here means the file is unusable
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UserError(
                f"checkpoint {path} cannot be read ({type(error).__name__}"
                f"{': ' + reason if reason else ''}); it is damaged or was not written by "
                f"fed-dfkd{fallback}"
            ) from error
        if not isinstance(state, dict):
            raise UserError(f"checkpoint {path} holds a {type(state).__name__}, expected the dict "
                            f"fed-dfkd saves; it was not written by fed-dfkd{fallback}")
        return state
