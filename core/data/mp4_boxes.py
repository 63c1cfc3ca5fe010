"""Why an MP4/MOV file FFmpeg cannot use is damaged, read from its top-level boxes.

FFmpeg's message for a cut-off MP4 depends on where the cut fell: "Invalid data", "End of file",
"has no video stream", even an unknown codec when the cut is inside the index. The box structure
says it plainly: an MP4 is a chain of boxes (4-byte size, 4-byte type) that must end exactly at the
end of the file, and its index ('moov') must be among them. Only headers are read, so this is cheap;
it is consulted after FFmpeg failed, so a file FFmpeg can use is never refused by it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# Top-level box types a QuickTime/ISO file may start with: an MP4 ('ftyp' first) or an old MOV.
_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}
_ADVICE = "re-export or re-download it"


def mp4_damage(path: Path) -> str | None:
    """A one-line reason when the file is an MP4/MOV whose box chain is cut short or has no index;
    None when it is not one, or its boxes are whole (then FFmpeg's own reason stands)."""
    try:
        with Path(path).open("rb") as handle:
            size = handle.seek(0, 2)
            return _walk(handle, size)
    except OSError:
        return None


def _walk(handle: BinaryIO, size: int) -> str | None:
    offset, seen = 0, set[bytes]()
    while offset < size:
        handle.seek(offset)
        header = handle.read(16)
        if len(header) < 8:
            return _cut(size, offset, None, offset + 8) if seen else None
        length, kind = struct.unpack(">I4s", header[:8])
        if not seen and kind not in _FIRST_BOXES:
            return None  # not an MP4 or MOV at all: random bytes, another container
        if length == 1:  # a 64-bit size follows the type
            if len(header) < 16:
                return _cut(size, offset, kind, offset + 16)
            length = struct.unpack(">Q", header[8:16])[0]
        elif length == 0:  # the last box, running to the end of the file
            length = size - offset
        if length < 8 or not kind.isascii() or not kind.decode("ascii").isprintable():
            # No box starts here: a writer that stopped before patching its sizes, or garbage.
            return None if b"moov" in seen or b"moof" in seen else _no_index()
        seen.add(kind)
        if offset + length > size:
            return _cut(size, offset, kind, offset + length)
        offset += length
    if b"moov" not in seen and b"moof" not in seen:
        return _no_index()
    return None


def _cut(size: int, offset: int, kind: bytes | None, needed: int) -> str:
    box = f"its {needed - offset:,}-byte '{kind.decode('ascii', 'replace')}' box" if kind else "a box header"
    return f"truncated: the file ends {size - offset:,} bytes into {box} (a copy or download cut short); {_ADVICE}"


def _no_index() -> str:
    return f"damaged: its index (the MP4 'moov' box) is missing, as when a recording or export stops early; {_ADVICE}"


def explained(path: Path, error: Exception) -> Exception:
    """The error to raise for a video that failed: the damage its boxes show, if any, else `error`."""
    from .media import UnusableMedia

    damage = mp4_damage(path)
    return UnusableMedia(damage) if damage else error
