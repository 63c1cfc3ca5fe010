"""Folders -> Items: each media file with its caption, or an Issue saying why it cannot train.

Two layouts are understood, decided folder by folder:

- a caption `.txt` with the same stem beside each media file (in any subfolder), and
- `videos/` (and/or `images/`) beside `captions/`: `videos/a/clip.mp4` takes `captions/a/clip.txt`
  (a `.txt` beside the media file is accepted when `captions/` has none).

Nothing is probed here: this is a fast walk with os.scandir, so it can run on every settings change.
See docs/data-pipeline.md, "Discovery".
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Issue

log = logging.getLogger(__name__)

CAPTION_EXTENSION = ".txt"
CAPTIONS_FOLDER = "captions"
PAIRED_MEDIA_FOLDERS = ("videos", "images")

# Reasons start with these, so the doctor can count caption problems without parsing text.
NO_CAPTION = "no caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption is not UTF-8"
CAPTION_UNREADABLE = "caption cannot be read"
CAPTION_PROBLEMS = (NO_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8, CAPTION_UNREADABLE)
SYMLINK_LOOP = "symlink loop"
FOLDER_UNREADABLE = "folder cannot be read"
DATASET_MISSING = "dataset folder"


@dataclass(frozen=True)
class Item:
    """One trainable media file and its caption, as found on disk (not yet probed)."""

    path: Path  # the media file, as reached from the dataset root (symlinks not resolved)
    caption: str
    caption_path: Path
    dataset_index: int
    repeats: int
    kind: str  # "video" or "image", by extension
    root: Path  # the dataset folder this item was found in
    # The folder's training options (its dataset section): the chance its caption is dropped for the
    # empty one at a use, and what its loss is multiplied by. Its caption_prefix is in `caption`.
    caption_dropout: float = 0.0
    loss_weight: float = 1.0

    @property
    def is_video(self) -> bool:
        return self.kind == "video"

    @property
    def relative_path(self) -> str:
        """The path inside its dataset folder, with '/' separators: stable across machines."""
        return self.path.relative_to(self.root).as_posix()


def media_kind(name: str) -> str | None:
    """'video' or 'image' by the file's extension (any case), or None for other files."""
    ext = os.path.splitext(name)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None


def discover(folder: Path, dataset_index: int = 0, repeats: int = 1) -> tuple[list[Item], list[Issue]]:
    """Every media file under folder with its caption, and an Issue for each problem found."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.exists():
        return [], [Issue(folder, f"{DATASET_MISSING} does not exist; check the dataset path")]
    if not folder.is_dir():
        return [], [Issue(folder, f"{DATASET_MISSING} is not a folder; point the dataset at the folder holding the clips")]
    walker = _Walker(folder, dataset_index, repeats)
    walker.walk(folder)
    items = sorted(walker.items, key=lambda i: str(i.path))
    issues = sorted(walker.issues, key=lambda i: (str(i.path), i.reason))
    log.debug("discovered %d items and %d issues in %s", len(items), len(issues), folder)
    return items, issues


def discover_with_captions(folder: Path) -> tuple[list[Item], list[Issue], dict[Path, Path]]:
    """discover(folder), and for every media file found (usable or not) its caption file or, where it
    has none, the path a new one goes to (beside it, or in the captions/ mirror): the dataset editor."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        items, issues = discover(folder)
        return items, issues, {}
    walker = _Walker(folder, 0, 1)
    walker.walk(folder)
    items = sorted(walker.items, key=lambda i: str(i.path))
    issues = sorted(walker.issues, key=lambda i: (str(i.path), i.reason))
    return items, issues, dict(sorted(walker.caption_places.items(), key=lambda kv: str(kv[0])))


def discover_datasets(config: dict[str, Any]) -> tuple[list[Item], list[Issue]]:
    """The items of every configured dataset (config["datasets"]), each with its repeats."""
    items: list[Item] = []
    issues: list[Issue] = []
    for index, dataset in enumerate(config.get("datasets") or []):
        raw = str(dataset.get("path") or "").strip()
        if not raw:
            # An empty path would mean the current folder: never scan that by accident.
            issues.append(Issue(Path(f"datasets[{index}]"), f"{DATASET_MISSING} path is empty; choose a folder of clips"))
            continue
        found, problems = discover(Path(raw), index, int(dataset.get("repeats", 1)))
        prefix, separator = str(dataset.get("caption_prefix") or ""), str(dataset.get("caption_separator", ", "))
        options = {"caption_dropout": float(dataset.get("caption_dropout", 0.0)), "loss_weight": float(dataset.get("loss_weight", 1.0))}
        items.extend(dataclasses.replace(item, caption=prefixed_caption(prefix, separator, item.caption), **options) for item in found)
        issues.extend(problems)
    return items, issues


def prefixed_caption(prefix: str, separator: str, caption: str) -> str:
    """The caption a dataset's caption_prefix makes: 'prefix<separator>caption' (just one where the
    other is empty), as the text encoder gets it."""
    prefix = prefix.strip()
    if not prefix:
        return caption
    return prefix + separator + caption if caption else prefix


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption text, None) or (None, reason). A UTF-8 byte order mark is accepted."""
    try:
        raw = path.read_bytes()
    except PermissionError:
        return None, f"{CAPTION_UNREADABLE} (permission denied); check its permissions"
    except OSError as e:
        return None, f"{CAPTION_UNREADABLE} ({e.strerror or e})"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"{CAPTION_NOT_UTF8} (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
    text = text.strip()
    if not text:
        return None, f"{EMPTY_CAPTION}; write a description of the clip in it"
    return text, None


class _Walker:
    """One recursive walk of a dataset folder. Each real folder is entered once, so a symlink loop
    (or a second link to a folder already scanned) cannot make the walk endless or duplicate items."""

    def __init__(self, root: Path, dataset_index: int, repeats: int):
        self.root = root
        self.dataset_index = dataset_index
        self.repeats = repeats
        self.items: list[Item] = []
        self.issues: list[Issue] = []
        self.visited: dict[tuple[int, int], Path] = {}
        self.seen_files: set[tuple[int, int]] = set()
        self.caption_maps: dict[Path, dict[str, Path]] = {}
        # Every media file met (usable or not) -> its caption file, or where one would go.
        self.caption_places: dict[Path, Path] = {}

    def walk(self, folder: Path, captions: Path | None = None, ancestors: tuple[tuple[int, int], ...] = ()) -> None:
        """Scan folder; captions is the mirror folder of captions for the videos/ + captions/ layout."""
        try:
            st = os.stat(folder)
        except OSError as e:
            self._link_problem(folder, e)
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            self.issues.append(Issue(folder, f"{SYMLINK_LOOP}: leads back to {self.visited[key]}; not followed"))
            return
        if key in self.visited:
            self.issues.append(Issue(folder, f"same folder as {self.visited[key]} (a link); scanned once", fatal=False))
            return
        self.visited[key] = folder
        ancestors = ancestors + (key,)

        entries = self._list(folder)
        if entries is None:
            return
        files: dict[str, os.DirEntry] = {}
        folders: dict[str, os.DirEntry] = {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    folders[entry.name] = entry
                elif entry.is_file():
                    files[entry.name] = entry
                elif entry.is_symlink():
                    self._broken_link(Path(entry.path))
            except OSError as e:
                self._link_problem(Path(entry.path), e)

        paired_captions = folders.get(CAPTIONS_FOLDER)
        paired = paired_captions is not None and any(name in folders for name in PAIRED_MEDIA_FOLDERS)
        self._scan_files(folder, files, captions)
        for name in sorted(folders):
            if paired and name == CAPTIONS_FOLDER:
                continue  # read through the media folders beside it
            mirror = captions / name if captions is not None else None
            if paired and name in PAIRED_MEDIA_FOLDERS:
                mirror = folder / CAPTIONS_FOLDER
            self.walk(folder / name, mirror, ancestors)

    def _list(self, folder: Path) -> list[os.DirEntry] | None:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except PermissionError:
            self.issues.append(Issue(folder, f"{FOLDER_UNREADABLE} (permission denied); skipped - check its permissions"))
        except OSError as e:
            self.issues.append(Issue(folder, f"{FOLDER_UNREADABLE} ({e.strerror or e}); skipped"))
        return None

    def _scan_files(self, folder: Path, files: dict[str, os.DirEntry], captions: Path | None) -> None:
        beside = {
            os.path.splitext(n)[0]: folder / n for n in sorted(files) if os.path.splitext(n)[1].lower() == CAPTION_EXTENSION
        }
        mirror = self._captions_in(captions) if captions is not None else {}
        used: set[str] = set()
        for name in sorted(files):
            kind = media_kind(name)
            if kind is None:
                continue
            path = folder / name
            if not self._first_sight(files[name], path):
                continue
            stem = os.path.splitext(name)[0]
            caption_path = mirror.get(stem) or beside.get(stem)
            expected = (captions if captions is not None else folder) / (stem + CAPTION_EXTENSION)
            self.caption_places[path] = caption_path or expected
            if caption_path is None:
                shown = expected.name if captions is None else expected.relative_to(self.root).as_posix()
                self.issues.append(Issue(path, f"{NO_CAPTION}: expected {shown}"))
                continue
            used.add(stem)
            text, problem = read_caption(caption_path)
            if problem is not None:
                self.issues.append(Issue(caption_path, f"{problem} (caption of {name})"))
                continue
            self.items.append(Item(path, text or "", caption_path, self.dataset_index, self.repeats, kind, self.root))
        if captions is None:
            # A caption whose media file is missing is often a typo in a name: worth a warning.
            for stem, caption in sorted(beside.items()):
                if stem not in used:
                    self.issues.append(Issue(caption, "caption without a video or image of the same name; ignored", fatal=False))

    def _captions_in(self, folder: Path) -> dict[str, Path]:
        """Stem -> caption file in a captions/ folder (extension in any case); read once per folder."""
        if folder in self.caption_maps:
            return self.caption_maps[folder]
        found: dict[str, Path] = {}
        if folder.is_dir():
            for entry in self._list(folder) or []:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() == CAPTION_EXTENSION and not entry.name.startswith(".") and _is_file(entry):
                    found.setdefault(stem, folder / entry.name)
        self.caption_maps[folder] = found
        return found

    def _first_sight(self, entry: os.DirEntry, path: Path) -> bool:
        """False for a file already found through another link (it would train twice)."""
        try:
            st = entry.stat() if not entry.is_symlink() else os.stat(path)
        except OSError as e:
            self._link_problem(path, e)
            return False
        key = (st.st_dev, st.st_ino)
        if st.st_ino and key in self.seen_files:
            self.issues.append(Issue(path, "same file as another one in this dataset (a link); used once", fatal=False))
            return False
        self.seen_files.add(key)
        return True

    def _broken_link(self, path: Path) -> None:
        try:
            os.stat(path)
        except OSError as e:
            self._link_problem(path, e)

    def _link_problem(self, path: Path, error: OSError) -> None:
        if error.errno == errno.ELOOP:
            self.issues.append(Issue(path, f"{SYMLINK_LOOP}: the link points back to itself; not followed"))
        elif isinstance(error, FileNotFoundError):
            # A dangling link to a clip loses that clip; to anything else it is only untidy.
            self.issues.append(Issue(path, "broken link: its target does not exist", fatal=media_kind(path.name) is not None))
        elif isinstance(error, PermissionError):
            self.issues.append(Issue(path, "cannot be read (permission denied); check its permissions"))
        else:
            self.issues.append(Issue(path, f"cannot be read ({error.strerror or error})"))


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False
