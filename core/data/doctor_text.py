"""The dataset doctor's report as aligned plain text, for the command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.paths import shown_path

from .doctor_report import EXIT_STRICT, EXIT_UNUSABLE, DatasetReport, SizeStat, Stat, images_only, item_unit
from .media import Issue

MAX_FILES_LISTED = 50  # longer file lists are cut (--json has them all); problems are never cut
PATH_COLUMN = 60  # paths longer than this push their reason along instead of widening the column


def render_report(report: DatasetReport) -> str:
    lines: list[str] = ["Dataset doctor", "=============="]
    lines += _datasets(report)
    lines += _media(report)
    lines += _buckets(report)
    lines += _files(report)
    lines += _plan(report)
    lines += _captions(report)
    lines += _issues("Problems, left out of training", [i for i in report.issues if i.fatal])
    lines += _issues("Warnings", [i for i in report.issues if not i.fatal])
    lines += ["", _result(report)]
    return "\n".join(lines) + "\n"


def _datasets(report: DatasetReport) -> list[str]:
    out = ["", "Datasets"]
    if not report.datasets:
        out.append("  (none configured)")
    for d in report.datasets:
        counts = _count(d.images, "image") if d.unit == "image" else f"{_count(d.clips, 'clip')}, {_count(d.images, 'image')}"
        out.append(f"  {d.index + 1}. {d.path}  (repeats {d.repeats}): {counts} to train on")
    folder = report.settings.get("validation_folder")
    if folder:
        out.append(f"  validation folder: {folder}")
    return out


def _media(report: DatasetReport) -> list[str]:
    if images_only(report):
        usable = _count(report.images, "image")
    else:
        usable = f"{_count(report.clips, 'clip')} ({_seconds(report.total_duration)} in all), {_count(report.images, 'image')}"
    out = ["", "Media", f"  found        {_count(report.media_found, 'media file')}; usable: {usable}"]
    rows = []
    if report.durations:
        rows.append(("duration", _stat(report.durations, _seconds)))
    if report.fps:
        rows.append(("fps", _stat(report.fps, lambda v: f"{v:.3g}")))
    if report.sizes:
        rows.append(("frame size", _sizes(report.sizes)))
    for name, cells in rows:
        out.append(f"  {name:<12} " + "  ".join(f"{c:<16}" for c in cells).rstrip())
    return out


def _buckets(report: DatasetReport) -> list[str]:
    s = report.settings
    if s.get("fixed_size"):
        height, width = s["fixed_size"]
        size = f"{width}x{height} pixels only, the size {s.get('model')} takes"
    else:
        size = f"about {s.get('resolution')}² pixels, sides in multiples of {s.get('size_divisor')}"
    frames = (f"; {s['frame_counts']} frames, as {s.get('model')} takes them" if s.get("frame_counts")
              else "; frame counts 4k + 1, sizes estimated: the model folder is not at hand")
    out = ["", f"Buckets (frames x height x width; {size}{frames})"]
    if not report.buckets:
        return out + ["  (nothing to train on)"]
    table = [
        (str(b.bucket).replace("x", " x "), b.kind, _count(b.items, "image" if b.kind == "image" else "clip"), f"{b.samples_per_pass} per pass", f"batch {b.batch_size}", _count(b.batches_per_pass, "batch", "batches"))
        for b in report.buckets
    ]
    return out + _table(table)


def _files(report: DatasetReport) -> list[str]:
    if not report.files:
        return []
    roots = [Path(d.path) for d in report.datasets]
    if report.settings.get("validation_folder"):
        roots.append(Path(report.settings["validation_folder"]))
    out = ["", "Files (frames kept per sample, and bucket)"]
    rows = []
    for f in report.files[:MAX_FILES_LISTED]:
        length = f"{_seconds(f.duration)} @ {f.fps:.3g} fps" if f.kind == "video" else "still"
        rows.append((shown_path(f.path, roots), f"{f.width}x{f.height}", length, _count(f.frames_kept, "frame"), str(f.bucket), f.split))
    out += _table(rows)
    if len(report.files) > MAX_FILES_LISTED:
        out.append(f"  ... and {len(report.files) - MAX_FILES_LISTED} more (--json lists every file)")
    return out


def _plan(report: DatasetReport) -> list[str]:
    s = report.settings
    out = ["", "Training plan"]
    held = f"{report.validation_items} held out for validation"
    if s.get("validation_folder"):
        held = f"{report.validation_items} from the validation folder"
    elif s.get("holdout_fraction"):
        held += f" (holdout_fraction {s['holdout_fraction']:g})"
    out.append(f"  {_count(report.train_items, _unit(report))} train, {held}")
    if report.train_items:
        if s.get("stop_after") == "EPOCHS":
            length = f"epochs {s.get('epochs')}"
        else:
            length = f"max_steps {s.get('max_steps')} x gradient_accumulation_steps {s.get('gradient_accumulation_steps')}"
        out.append(f"  {_count(report.batches_per_pass, 'batch', 'batches')} per pass; {length} = {report.total_batches} batches")
        out.append(f"  batch sizes: images {s.get('batch_size')}, videos {s.get('video_batch_size')}; {report.optimizer_steps} optimizer steps")
    for d in report.datasets:
        if not d.rating:
            continue
        times = f"{d.times_seen:.0f}" if d.times_seen >= 100 else f"{d.times_seen:.3g}"
        line = f"  dataset {d.index + 1}: each {d.unit} seen about {times} times: {d.rating}"
        out.append(line + (f" - {d.hint}" if d.hint else ""))
    return out


def _captions(report: DatasetReport) -> list[str]:
    c = report.captions
    return ["", f"Captions: {c.get('missing', 0)} missing, {c.get('empty', 0)} empty, {c.get('not_utf8', 0)} not UTF-8, {c.get('unreadable', 0)} unreadable"]


def _issues(title: str, issues: list[Issue]) -> list[str]:
    if not issues:
        return []
    width = min(PATH_COLUMN, max(len(str(i.path)) for i in issues))
    return ["", f"{title} ({len(issues)})"] + [f"  {i.path!s:<{width}}  {i.reason}" for i in issues]


def _result(report: DatasetReport) -> str:
    code = report.exit_code
    if code == EXIT_UNUSABLE:
        return f"Result: nothing to train on - {report.why_unusable}."
    if code == EXIT_STRICT:
        n = len(report.fatal_issues)
        return f"Result: strict_data refused it - {_count(n, 'problem')} above; fix them or turn strict_data off to skip those files."
    skipped = len(report.fatal_issues)
    tail = f"; {_count(skipped, 'problem')} skipped (see above)" if skipped else ""
    return f"Result: ready - {_count(report.train_items, _unit(report))} can train{tail}."


def _unit(report: DatasetReport) -> str:
    """What the report's items are: "image" (an image model's, or only images), "clip" or "item"."""
    return item_unit(report.clips, report.images, bool(report.settings.get("stills_only")))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"


def _stat(stat: Stat, fmt: Callable[[float], str]) -> list[str]:
    return [f"min {fmt(stat.minimum)}", f"median {fmt(stat.median)}", f"max {fmt(stat.maximum)}"]


def _sizes(stat: SizeStat) -> list[str]:
    return [f"{name} {w}x{h}" for name, (w, h) in (("min", stat.minimum), ("median", stat.median), ("max", stat.maximum))]
