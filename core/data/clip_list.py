"""One dataset folder as the dataset editor shows it: every media file with its caption file (or
where one would go), its caption text, and the problems discovery and the doctor found.

Listing only walks the folder and reads the small caption files (core.data.discovery); what probing
knows (duration, size, bucket) comes from the doctor's report, merged in by `with_report`. Saving a
caption writes it to a temporary name and renames it over the old one (core.atomic), so a failed
write leaves the old caption as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import explained_write_errors, write_text_atomic
from core.errors import UserError

from .buckets import Bucket
from .discovery import CAPTION_PROBLEMS, discover_with_captions, media_kind
from .media import Issue


@dataclass(frozen=True)
class ClipEntry:
    path: Path  # the media file
    kind: str  # "video" or "image"
    caption_path: Path  # its caption file, or where a new one goes
    caption: str  # the caption file's text ("" when there is none)
    has_caption: bool  # a caption file with text in it exists
    problems: tuple[Issue, ...] = ()  # about the file or its caption, fatal ones first
    # From the doctor's report, once it has probed the file (None before, or for an unusable file).
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    bucket: Bucket | None = None

    @property
    def fatal(self) -> bool:
        """Left out of training (a problem that is not only a warning)."""
        return any(p.fatal for p in self.problems)

    def problem_text(self) -> str:
        return "\n".join(p.reason + ("" if p.fatal else " (a warning)") for p in self.problems)


def _caption_text(path: Path) -> str:
    """A caption file's text for editing: "" when missing; undecodable bytes shown replaced."""
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace").strip()
    except OSError:
        return ""


def list_clips(folder: Path) -> tuple[list[ClipEntry], list[Issue]]:
    """Every media file under folder, sorted by path, and the folder's problems that name no media
    file (an unreadable subfolder, a caption without its clip)."""
    items, issues, places = discover_with_captions(Path(folder))
    usable = {item.path for item in items}
    by_media: dict[Path, list[Issue]] = {}
    caption_of = {caption: media for media, caption in places.items()}
    rest: list[Issue] = []
    for issue in issues:
        media = issue.path if issue.path in places else caption_of.get(issue.path)
        if media is None:
            rest.append(issue)
        else:
            by_media.setdefault(media, []).append(issue)
    entries = []
    for media, caption_path in places.items():
        problems = by_media.get(media, [])
        text = _caption_text(caption_path)
        has = media in usable or (bool(text) and not any(p.reason.startswith(CAPTION_PROBLEMS) for p in problems))
        entries.append(ClipEntry(media, media_kind(media.name) or "video", caption_path, text, has,
                                 tuple(sorted(problems, key=lambda p: not p.fatal))))
    return entries, rest


def with_report(entries: Iterable[ClipEntry], files: Iterable[Any], issues: Iterable[Issue]) -> list[ClipEntry]:
    """The entries with what a doctor's report says of them: duration, size and bucket from its
    file plans (`DatasetReport.files`), and its problems (probing's, the model's frame rule's)
    beside discovery's."""
    plans = {Path(f.path): f for f in files}
    entries = list(entries)
    caption_of = {e.caption_path: e.path for e in entries}
    extra: dict[Path, list[Issue]] = {}
    for issue in issues:
        media = issue.path if issue.path not in caption_of else caption_of[issue.path]
        extra.setdefault(Path(media), []).append(issue)
    out = []
    for entry in entries:
        plan = plans.get(entry.path)
        problems = list(entry.problems)
        problems += [i for i in extra.get(entry.path, []) if i not in problems]
        probed = {} if plan is None else {"duration": plan.duration, "width": plan.width, "height": plan.height, "bucket": plan.bucket}
        out.append(dataclasses.replace(entry, problems=tuple(sorted(problems, key=lambda p: not p.fatal)), **probed))
    return out


def save_caption(entry: ClipEntry, text: str) -> ClipEntry:
    """Write text as the entry's caption (UTF-8, atomically) and return the entry as it is now.

    An empty text is refused rather than written: discovery would then leave the clip out as
    'empty caption'; UserError names the file when the write fails (the old caption stays)."""
    text = text.strip()
    if not text:
        raise UserError(f"{entry.caption_path.name}: a caption cannot be empty; write a description of the clip")
    with explained_write_errors(entry.caption_path, "the caption"):
        entry.caption_path.parent.mkdir(parents=True, exist_ok=True)  # a captions/ mirror folder may not exist yet
        write_text_atomic(entry.caption_path, text + "\n")
    remaining = tuple(p for p in entry.problems if not p.reason.startswith(CAPTION_PROBLEMS))
    return dataclasses.replace(entry, caption=text, has_caption=True, problems=remaining)
