"""Messages in the window's words: a setting's key (`video_config.max_frames`) becomes the label of
its field (“Video config › Max frames”), as the user sees it on the tab.

core's messages name keys, which is right for `main.py --set key=value` and preset files; the window
shows the same messages with the labels instead. A key with a dot or an underscore is unambiguous
and replaced wherever it stands; a one-word key (`frames`, `resolution`) is replaced only where it
is quoted or starts the message, since it is also an ordinary word ("the window frames are picked
from").
"""

from __future__ import annotations

import functools
import html
import re

from core.config.fields import Section
from core.config.settings import iter_settings, lookup


def field_label(key: str) -> str:
    """What the window calls a setting: its title, after its section's ('Transformer › Weight dtype')."""
    parts = key.split(".")
    titles = []
    for i in range(1, len(parts) + 1):
        node = lookup(".".join(parts[:i]))
        titles.append(node.title)
    if len(titles) > 1 and isinstance(lookup(".".join(parts[:-1])), Section):
        return " › ".join(titles)
    return titles[-1]


@functools.cache
def _patterns() -> list[tuple[re.Pattern[str], str]]:
    out = []
    keys = sorted((key for key, _node in iter_settings()), key=len, reverse=True)
    for key in keys:
        label = f"“{field_label(key)}”"
        escaped = re.escape(key)
        if "." in key or "_" in key:
            # Not part of a longer name: 'datasets[0].path' or 'x.frames' are left alone.
            out.append((re.compile(rf"'?(?<![\w.\[\]]){escaped}(?![\w\[]|\.\w)'?"), label))
        else:
            out.append((re.compile(rf"'{escaped}'|^{escaped}(?=[ :])"), label))
    return out


def labelled(message: str) -> str:
    """The message with every setting's key replaced by its field's label."""
    for pattern, label in _patterns():
        message = pattern.sub(label, message)
    return message


def wrapped_tooltip(text: str) -> str:
    """A tooltip that wraps: Qt shows plain text on one line as long as the screen, but wraps rich
    text, so the text goes in as rich text (escaped, its line breaks kept)."""
    if not text:
        return ""
    body = "<br>".join(html.escape(line, quote=False) for line in text.splitlines())
    return f"<qt>{body}</qt>"
