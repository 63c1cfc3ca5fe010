"""Draw the Video Trainer app icon: resources/icon.png (256x256) and resources/icon.ico.

Run from anywhere:  python resources/make_icon.py

The icon is a rounded tile with a blue-violet gradient, a tilted film strip and a
play triangle, plus a small spark for "training". It is drawn with QPainter on an
offscreen QImage, so no display is needed.

The .ico holds PNG images (allowed since Windows Vista) at 256, 64, 48, 32 and 16 px:
Windows picks the nearest size for the desktop shortcut, taskbar and title bar, and
small sizes drawn on purpose look sharper than a 256 px image shrunk by Windows.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

# Must be set before Qt starts: there may be no display (CI, SSH).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QPointF, QRectF, Qt  # noqa: E402
from PySide6.QtGui import (  # noqa: E402
    QBrush,
    QColor,
    QGuiApplication,
    QImage,
    QLinearGradient,
    QPainter,
    QPainterPath,
    QPen,
    QPolygonF,
    QRadialGradient,
)

HERE = Path(__file__).resolve().parent
ICO_SIZES = (256, 64, 48, 32, 16)


def draw_icon(size: int) -> QImage:
    """Draw the icon at `size` px. Geometry is defined on a 256 grid and scaled."""
    img = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    img.fill(Qt.GlobalColor.transparent)
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    p.scale(size / 256.0, size / 256.0)

    # Background tile: rounded square, violet (top left) to deep blue (bottom right).
    tile = QRectF(8, 8, 240, 240)
    bg = QLinearGradient(tile.topLeft(), tile.bottomRight())
    bg.setColorAt(0.0, QColor("#7b3fe4"))
    bg.setColorAt(1.0, QColor("#1c3fa8"))
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(bg))
    p.drawRoundedRect(tile, 52, 52)

    # Soft highlight in the upper half so the tile does not look flat.
    glow = QRadialGradient(QPointF(96, 56), 170)
    glow.setColorAt(0.0, QColor(255, 255, 255, 70))
    glow.setColorAt(1.0, QColor(255, 255, 255, 0))
    p.setBrush(QBrush(glow))
    p.drawRoundedRect(tile, 52, 52)

    # Film strip, tilted a little; clipped to the tile so its ends follow the corners.
    clip = QPainterPath()
    clip.addRoundedRect(tile, 52, 52)
    p.save()
    p.setClipPath(clip)
    p.translate(128, 140)
    p.rotate(-12)
    strip = QRectF(-150, -58, 300, 116)
    p.setBrush(QColor(16, 18, 36, 235))
    p.drawRect(strip)
    # Sprocket holes along both edges.
    p.setBrush(QColor(255, 255, 255, 215))
    for i in range(-7, 8):
        x = i * 22 - 6
        p.drawRoundedRect(QRectF(x, -50, 12, 12), 3, 3)
        p.drawRoundedRect(QRectF(x, 38, 12, 12), 3, 3)
    # Three frames between the holes, the middle one lit.
    for i, alpha in ((-1, 70), (0, 255), (1, 70)):
        frame = QRectF(i * 74 - 32, -30, 64, 60)
        g = QLinearGradient(frame.topLeft(), frame.bottomRight())
        g.setColorAt(0.0, QColor(255, 176, 64, alpha))
        g.setColorAt(1.0, QColor(255, 92, 120, alpha))
        p.setBrush(QBrush(g))
        p.drawRoundedRect(frame, 6, 6)
    # Play triangle on the lit frame.
    p.setBrush(QColor("#ffffff"))
    p.drawPolygon(QPolygonF([QPointF(-11, -17), QPointF(-11, 17), QPointF(18, 0)]))
    p.restore()

    # Spark: a four-pointed star at the top right, "something is learning".
    p.save()
    p.translate(190, 62)
    star = QPainterPath()
    outer, inner = 30.0, 7.0
    pts = [
        QPointF(0, -outer), QPointF(inner, -inner), QPointF(outer, 0), QPointF(inner, inner),
        QPointF(0, outer), QPointF(-inner, inner), QPointF(-outer, 0), QPointF(-inner, -inner),
    ]
    star.addPolygon(QPolygonF(pts))
    star.closeSubpath()
    sg = QRadialGradient(QPointF(0, 0), outer)
    sg.setColorAt(0.0, QColor("#fffbe6"))
    sg.setColorAt(1.0, QColor("#ffd54a"))
    p.setBrush(QBrush(sg))
    p.setPen(QPen(QColor(255, 213, 74, 120), 1.5))
    p.drawPath(star)
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QColor("#ffe9a0"))
    p.drawEllipse(QPointF(-36, -20), 4.5, 4.5)  # a smaller sparkle beside it
    p.restore()

    p.end()
    return img


def png_bytes(img: QImage) -> bytes:
    buf = QByteArray()
    dev = QBuffer(buf)
    dev.open(QIODevice.OpenModeFlag.WriteOnly)
    if not img.save(dev, "PNG"):
        raise RuntimeError("Qt could not encode the icon as PNG")
    dev.close()
    return bytes(buf.data())


def ico_bytes(pngs: list[tuple[int, bytes]]) -> bytes:
    """ICONDIR + one ICONDIRENTRY per image, each pointing at PNG data."""
    header = struct.pack("<HHH", 0, 1, len(pngs))  # reserved, type 1 = icon, count
    offset = len(header) + 16 * len(pngs)
    entries, blobs = b"", b""
    for size, data in pngs:
        dim = 0 if size >= 256 else size  # 0 means 256 in the ICO format
        entries += struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(data), offset)
        blobs += data
        offset += len(data)
    return header + entries + blobs


def main() -> int:
    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 - fonts/raster need it
    images = {s: png_bytes(draw_icon(s)) for s in ICO_SIZES}
    (HERE / "icon.png").write_bytes(images[256])
    (HERE / "icon.ico").write_bytes(ico_bytes([(s, images[s]) for s in ICO_SIZES]))
    print(f"wrote {HERE / 'icon.png'} and {HERE / 'icon.ico'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
