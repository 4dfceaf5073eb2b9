"""The output directory: where a run writes, and the promise that it deletes only what it wrote.

People point ``--output_dir`` at folders that hold other things: their thesis, the dataset itself, the
working directory. So every file a run writes is recorded in a manifest (``.run_manifest.json``) the
moment it is written, and:

  * a folder holding anything that is not in its manifest is refused, with or without ``--overwrite``,
    and the refusal lists a few of those entries;
  * ``--overwrite`` deletes exactly the files of the manifest (then the folders it made, if empty);
  * the working directory, a parent of it, the home directory and the filesystem root are never
    overwritten, and a file is never taken for an output folder.

All checks run before any model is loaded, on every process, so a refusal costs nothing and stops
every process the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MANIFEST = ".run_manifest.json"
# Written by us, but under names we do not know in advance: half-written checkpoints (a crash), the
# abandoned line of checkpoints moved aside on resume, and the experiment tracker's event files.
OWNED_PREFIXES = ("checkpoints/.incomplete_", "checkpoints/abandoned/", "logs/")


class OutputDirError(ValueError):
    """The output directory cannot be used as asked; the message says why and what to do instead."""


def _relative_files(root: Path, paths) -> set[str]:
    found = set()
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            found |= {str(p.relative_to(root)) for p in path.rglob("*") if not p.is_dir()}
        elif path.exists() or path.is_symlink():
            found.add(str(path.relative_to(root)))
    return found


class RunDir:
    """One run's output directory and the manifest of the files written into it."""

    def __init__(self, path: str | Path):
        # Symlinks resolved: the checks and any deletion act on the real folder, never on the link.
        self.path = Path(path).expanduser().resolve()
        self.manifest = self.path / MANIFEST

    # -- reading ---------------------------------------------------------------------------------

    def recorded(self) -> set[str]:
        if not self.manifest.is_file():
            return set()
        try:
            return set(json.loads(self.manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError):
            raise OutputDirError(f"the manifest '{self.manifest}' is damaged, so which files are this tool's cannot "
                                 "be told apart; pick another --output_dir") from None

    def is_run(self) -> bool:
        return self.manifest.is_file()

    def foreign_entries(self) -> list[str]:
        """Files and folders in the output dir that no run of ours wrote, shallowest first."""
        if not self.path.is_dir():
            return []
        ours = self.recorded() | {MANIFEST, MANIFEST + ".tmp"}
        ours_dirs = {str(p) for f in ours for p in Path(f).parents}
        foreign = []
        for entry in sorted(self.path.rglob("*"), key=lambda p: (len(p.parts), str(p))):
            rel = str(entry.relative_to(self.path))
            if rel in ours or rel.startswith(OWNED_PREFIXES) or rel + "/" in OWNED_PREFIXES:
                continue
            if entry.is_dir() and not entry.is_symlink() and rel in ours_dirs:
                continue  # a folder we wrote into: its contents are judged one by one
            if not any(rel.startswith(f + "/") for f in foreign):
                foreign.append(rel + ("/" if entry.is_dir() else ""))
        return foreign

    # -- the start-up check ----------------------------------------------------------------------

    def check(self, *, overwrite: bool, resuming: bool, inputs: list[str] = (), describe_run=None) -> None:
        """Refuse an output dir that cannot be used as asked (raises OutputDirError); writes nothing.
        ``describe_run(path)`` may say how the run already there differs from this one."""
        where = f"--output_dir '{self.path}'"
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{where} is a file, not a folder; pass a folder name")
        for name in inputs:
            if name and Path(name).expanduser().exists() and Path(name).expanduser().resolve() == self.path:
                raise OutputDirError(f"{where} is one of the run's inputs ({name}); pass another folder")
        if overwrite and resuming:
            raise OutputDirError("--overwrite and --resume_from_checkpoint contradict each other: --overwrite deletes "
                                 "the run's checkpoints before the resume could read them; drop one of them")
        home, cwd = Path.home().resolve(), Path.cwd().resolve()
        if overwrite and self.path in {home, cwd, Path(self.path.anchor), *cwd.parents}:
            raise OutputDirError(f"{where} is the working, home or root directory (or a parent of the working one); "
                                 "--overwrite is never applied there: pass a dedicated folder")
        ancestor = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputDirError(f"{where} cannot be written ('{ancestor}' is not a writable folder); pass a folder "
                                 "you can write to")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            kind = "holds files this tool did not write" if self.is_run() else "is not empty and holds no run of ours"
            raise OutputDirError(f"{where} {kind} ({shown}); nothing there is deleted, with or without --overwrite: "
                                 "pick an empty or new --output_dir")
        if not self.is_run() or overwrite or resuming:
            return
        detail = describe_run(self.path) if describe_run else ""
        raise OutputDirError(f"{where} already holds a run{detail}; pass --resume_from_checkpoint latest to continue it, "
                             "another --output_dir, or --overwrite to delete that run's own files (its checkpoints, "
                             "adapter and results) and start over")

    # -- writing (main process only) -------------------------------------------------------------

    def claim(self, overwrite: bool) -> None:
        """Create the folder and its manifest; with ``overwrite``, first delete the previous run's files."""
        if overwrite and self.is_run():
            self.remove(self.recorded())
            self._save_manifest(set())
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.manifest.is_file():
            self._save_manifest(set())

    def record(self, *paths) -> None:
        """Add files (or every file under folders) that we just wrote to the manifest."""
        self._save_manifest(self.recorded() | _relative_files(self.path, paths))

    def remove(self, relative_files) -> None:
        """Delete the given files *if the manifest lists them*, then the folders they leave empty."""
        listed = self.recorded()
        doomed = [f for f in relative_files if f in listed]
        for rel in doomed:
            target = self.path / rel
            if target.is_file() or target.is_symlink():
                target.unlink()
        for folder in sorted({p for rel in doomed for p in (self.path / rel).parents if self.path in p.parents},
                             key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self._save_manifest(listed - set(doomed))

    def remove_tree(self, folder: Path) -> None:
        """``remove`` for every recorded file under ``folder`` (a checkpoint, the best adapter ...)."""
        prefix = str(Path(folder).resolve().relative_to(self.path)) + "/"
        self.remove([f for f in self.recorded() if f.startswith(prefix)])

    def replace_tree(self, source: Path, target: Path) -> None:
        """Make ``target`` (inside the run) a copy of ``source``, deleting only what we wrote there."""
        self.remove_tree(target)
        if target.exists() and any(target.iterdir()):
            raise OutputDirError(f"'{target}' holds files this tool did not write; move them away and resume again")
        shutil.copytree(source, target, dirs_exist_ok=True)
        self.record(target)

    def moved(self, old: Path, new: Path) -> None:
        """Keep the manifest right after a folder of ours was renamed (checkpoints moved aside)."""
        old_prefix = str(Path(old).resolve().relative_to(self.path)) + "/"
        new_prefix = str(Path(new).resolve().relative_to(self.path)) + "/"
        self._save_manifest({new_prefix + f[len(old_prefix):] if f.startswith(old_prefix) else f
                             for f in self.recorded()})

    @contextmanager
    def recording(self, main: bool = True):
        """Record every file written or rewritten inside the block (what a library's ``save_pretrained``
        writes is not known in advance: adapter, tokenizer, model card ...). Only the main process writes."""
        before = self._mtimes() if main else {}
        yield
        if main:
            after = self._mtimes()
            self.record(*[self.path / rel for rel, mtime in after.items() if before.get(rel) != mtime])

    def _mtimes(self) -> dict:
        return {str(p.relative_to(self.path)): p.stat().st_mtime_ns for p in self.path.rglob("*") if p.is_file()}

    def checkpoints_written(self, added, pruned) -> None:
        """After a checkpoint save: record the new one, delete the pruned ones (only files we wrote)."""
        self.record(*added)
        for folder in pruned:
            self.remove_tree(folder)
            if folder.exists():  # something not ours was left inside: keep it, say so
                print(f"warning: kept '{folder}': it holds files this tool did not write")

    def restore_best(self, source: Path, target: Path) -> None:
        """On resume, the best adapter is the resumed line's (kept in the checkpoint), not whatever an
        abandoned line left in ``target``."""
        if source.is_dir():
            self.replace_tree(source, target)
        else:
            self.remove_tree(target)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        self.record(path)
        return path

    def _save_manifest(self, files: set[str]) -> None:
        temporary = self.manifest.with_name(MANIFEST + ".tmp")
        temporary.write_text(json.dumps({"tool": "lora-text-classification", "files": sorted(files)}, indent=0))
        os.replace(temporary, self.manifest)  # atomic: the manifest is never half-written
