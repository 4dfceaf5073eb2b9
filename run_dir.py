"""The output directory: one run per folder at a time, and nothing of anyone's ever deleted.

People point ``--output_dir`` at folders that hold other things: their thesis, the dataset itself, the
working directory. Each guarantee below holds because the code that could break it does not exist,
not because a check catches each way it could break:

  * **A start deletes nothing.** ``--overwrite`` renames the previous run, whole, to a sibling
    ``OUTPUT_DIR.previous-YYYYmmdd-HHMMSS`` (undo: rename it back). No file is read to decide what to
    remove, so no edited file can widen it.
  * **A run starts only in a folder that is new, empty, or holds a run of this tool** (it has
    ``run_config.json``). A folder holding anything else is refused, with or without ``--overwrite``.
  * **A run never writes over what it reads.** No input (dataset, eval file, model folder, checkpoint
    to resume from is the exception: it lives in the run) may lie inside the output dir, and the output
    dir may not lie inside an input folder.
  * **One run per output dir at a time.** The main process holds an OS lock (``fcntl.flock``) on
    ``OUTPUT_DIR/.lock`` for the whole run. The kernel releases it when the process ends, however it
    ends, so a crashed or killed run never leaves the folder locked.

The only files a run ever removes are checkpoints it wrote itself, earlier in the same process
(``--keep_checkpoints``, ``checkpointing.prune``): it knows them from memory, not from disk.

Everything here except ``claim`` only reads, so the start-up check runs on every process before any
model is loaded: a refusal costs nothing and stops every process the same way.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

RUN_MARKER = "run_config.json"  # written first by every run: a folder holding it is a run of this tool
LOCK_FILE = ".lock"


class OutputDirError(ValueError):
    """The output directory cannot be used as asked; the message says why and what to do instead."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def unused_path(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... whichever does not exist yet: a move never lands on what is there."""
    return next(path.with_name(name) for name in (path.name, *(f"{path.name}-{n}" for n in range(2, 10**6)))
                if not path.with_name(name).exists())


def _resolved(name: str | None) -> Path | None:
    if not name or name.startswith("embedded:"):
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


class RunDir:
    """One run's output directory."""

    def __init__(self, path: str | Path):
        # Symlinks resolved: the checks and the rename act on the real folder, never on the link.
        self.path = Path(path).expanduser().resolve()
        self._lock = None
        self._checked = {}

    def is_run(self) -> bool:
        return (self.path / RUN_MARKER).is_file()

    def is_empty(self) -> bool:
        return not self.path.is_dir() or all(p.name == LOCK_FILE for p in self.path.iterdir())

    # -- the start-up check (read-only) ------------------------------------------------------------

    def check(self, *, overwrite: bool, resuming: bool, inputs: list[str] = (), input_folders: list[str] = (),
              describe_run=None) -> None:
        """Refuse an output dir that cannot be used as asked (raises OutputDirError); writes nothing.
        ``inputs`` must not lie inside it; ``input_folders`` (the model) must not hold it either.
        ``describe_run(path)`` may say how the run already there differs from this one."""
        self._checked = dict(overwrite=overwrite, resuming=resuming, inputs=inputs, input_folders=input_folders,
                             describe_run=describe_run)
        where = f"--output_dir '{self.path}'"
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{where} is a file, not a folder; pass a folder name")
        for name in [*inputs, *input_folders]:
            path = _resolved(name)
            if path is not None and (_inside(path, self.path) or (name in input_folders and _inside(self.path, path))):
                raise OutputDirError(f"{where} and the input '{name}' overlap (one lies inside the other), so the "
                                     "run could write over what it reads; put the output dir elsewhere")
        if overwrite and resuming:
            raise OutputDirError("--overwrite and --resume_from_checkpoint contradict each other: --overwrite moves "
                                 "the run (and its checkpoints) aside before the resume could read them; drop one")
        home, cwd = Path.home().resolve(), Path.cwd().resolve()
        if overwrite and self.path in {home, cwd, Path(self.path.anchor), *cwd.parents}:
            raise OutputDirError(f"{where} is the working, home or root directory (or a parent of the working one); "
                                 "--overwrite never moves those: pass a dedicated folder")
        ancestor = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputDirError(f"{where} cannot be written ('{ancestor}' is not a writable folder); pass a folder "
                                 "you can write to")
        if self.is_empty():
            return
        if not self.is_run():
            raise OutputDirError(f"{where} is not empty and holds no run of this tool (no {RUN_MARKER}); a run "
                                 "starts only in a new or empty folder: pick another --output_dir")
        if overwrite or resuming:
            return
        detail = describe_run(self.path) if describe_run else ""
        raise OutputDirError(f"{where} already holds a run{detail}; pass --resume_from_checkpoint latest to continue it, "
                             "another --output_dir, or --overwrite to move that run aside (renamed, not deleted) and "
                             "start over")

    # -- claiming (main process only) ----------------------------------------------------------------

    def claim(self) -> Path | None:
        """Lock the folder for this run, check it again under the lock (another start may have come first),
        and with ``--overwrite`` move the previous run aside. Returns where it went, if anywhere."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire()
        self.check(**self._checked)
        if not (self._checked.get("overwrite") and self.is_run()):
            return None
        aside = unused_path(self.path.with_name(f"{self.path.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.rename(self.path, aside)  # one rename: atomic, and undone by renaming it back
        previous_lock = self._lock  # still held: it moved with the folder
        self.path.mkdir()
        self._lock = self._acquire()
        previous_lock.close()
        return aside

    def _acquire(self):
        handle = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputDirError(f"--output_dir '{self.path}' is in use by another run that is still going; wait for "
                                 "it to end, or pick another --output_dir") from None
        return handle

    def claim_on_main(self, accelerator, record: dict) -> None:
        """The main process claims the folder and writes ``run_config.json`` (``record``); every process
        learns whether that worked, so a refusal stops them all (one waiting forever would hang the job)."""
        from accelerate.utils import broadcast_object_list

        accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes to it
        refusal = None
        if accelerator.is_main_process:
            try:
                aside = self.claim()
                if aside is not None:
                    accelerator.print(f"--overwrite: moved the previous run to '{aside}' (nothing deleted)")
                (self.path / RUN_MARKER).write_text(json.dumps(record, indent=2))
            except OutputDirError as err:
                refusal = str(err)
            except OSError as err:  # e.g. under /proc, which os.access calls writable for root
                refusal = f"--output_dir '{self.path}' cannot be written ({err.strerror}); pass a folder you can write to"
        refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise OutputDirError(refusal)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
