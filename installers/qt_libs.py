#!/usr/bin/env python3
"""Which system libraries Qt's window needs on Linux, and the command that installs them.

PySide6's wheels bring Qt itself, but its X11 platform plugin (plugins/platforms/libqxcb.so) links
system libraries that a minimal desktop may lack (libxcb-cursor0, libxcb-icccm4, libxcb-keysyms1,
...). Without them Qt only says "no Qt platform plugin could be initialized". installers/start.sh and
installers/install.sh run this script with the app's Python before the window opens: it runs `ldd`
on the plugin (ldd lists the libraries of the libraries too), and for each one "not found" names
the package of this distribution and prints one install command (apt-get for Debian and Ubuntu,
dnf for Fedora, pacman for Arch, zypper for openSUSE).

    python installers/qt_libs.py            exit 0: nothing missing; 3: missing (the command printed)
    python installers/qt_libs.py --ldd-output FILE --os-release FILE   (tests: no ldd, no real system)

Only the standard library: it runs before anything of the app is known to work. It never imports Qt.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("qt_libs")

EXIT_OK = 0
EXIT_MISSING = 3
PLUGIN = Path("Qt") / "plugins" / "platforms" / "libqxcb.so"

# soname -> package per package manager: (apt-get, dnf, pacman, zypper).
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor", "xcb-util-cursor", "libxcb-cursor0"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm", "xcb-util-wm", "libxcb-icccm4"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms", "xcb-util-keysyms", "libxcb-keysyms1"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image", "xcb-util-image", "libxcb-image0"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil", "xcb-util-renderutil", "libxcb-render-util0"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util", "xcb-util", "libxcb-util1"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb", "libxcb", "libxcb-xkb1"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb", "libxcb", "libxcb-shape0"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb", "libxcb", "libxcb-randr0"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb", "libxcb", "libxcb-render0"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb", "libxcb", "libxcb-shm0"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb", "libxcb", "libxcb-sync1"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb", "libxcb", "libxcb-xfixes0"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb", "libxcb", "libxcb-xinerama0"),
    "libxcb-xinput.so.0": ("libxcb-xinput0", "libxcb", "libxcb", "libxcb-xinput0"),
    "libxcb-glx.so.0": ("libxcb-glx0", "libxcb", "libxcb", "libxcb-glx0"),
    "libxcb.so.1": ("libxcb1", "libxcb", "libxcb", "libxcb1"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11", "libxkbcommon-x11", "libxkbcommon-x11-0"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon", "libxkbcommon", "libxkbcommon0"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb", "libx11", "libX11-xcb1"),
    "libX11.so.6": ("libx11-6", "libX11", "libx11", "libX11-6"),
    "libXau.so.6": ("libxau6", "libXau", "libxau", "libXau6"),
    "libXdmcp.so.6": ("libxdmcp6", "libXdmcp", "libxdmcp", "libXdmcp6"),
    "libSM.so.6": ("libsm6", "libSM", "libsm", "libSM6"),
    "libICE.so.6": ("libice6", "libICE", "libice", "libICE6"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig", "fontconfig", "libfontconfig1"),
    "libfreetype.so.6": ("libfreetype6", "freetype", "freetype2", "libfreetype6"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl", "libglvnd", "libEGL1"),
    "libGL.so.1": ("libgl1", "libglvnd-glx", "libglvnd", "libGL1"),
    "libGLX.so.0": ("libglx0", "libglvnd-glx", "libglvnd", "libGLX0"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl", "libglvnd", "libOpenGL0"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs", "dbus", "libdbus-1-3"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2", "glib2", "libglib-2_0-0"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2", "glib2", "libgthread-2_0-0"),
}

# Package managers by distribution family: (name, command, index into PACKAGES' tuples).
MANAGERS = {
    "debian": ("apt-get", "sudo apt-get install -y", 0),
    "fedora": ("dnf", "sudo dnf install -y", 1),
    "arch": ("pacman", "sudo pacman -S --needed", 2),
    "suse": ("zypper", "sudo zypper install", 3),
}
# /etc/os-release ID or ID_LIKE word -> family.
FAMILIES = {
    "debian": "debian", "ubuntu": "debian", "linuxmint": "debian", "pop": "debian", "elementary": "debian",
    "raspbian": "debian", "kali": "debian", "zorin": "debian",
    "fedora": "fedora", "rhel": "fedora", "centos": "fedora", "rocky": "fedora", "almalinux": "fedora", "nobara": "fedora",
    "arch": "arch", "manjaro": "arch", "endeavouros": "arch", "garuda": "arch", "cachyos": "arch",
    "opensuse": "suse", "suse": "suse", "sles": "suse", "opensuse-leap": "suse", "opensuse-tumbleweed": "suse",
}

_NOT_FOUND = re.compile(r"^\s*(\S+)\s*=>\s*not found\s*$")


def missing_libraries(ldd_output: str) -> list[str]:
    """The sonames `ldd` reports as "not found", in its order, each once."""
    found = [m.group(1) for line in ldd_output.splitlines() if (m := _NOT_FOUND.match(line))]
    return list(dict.fromkeys(found))


def distribution_family(os_release: str) -> str | None:
    """debian / fedora / arch / suse from the text of /etc/os-release (ID, then ID_LIKE), else None."""
    values: dict[str, str] = {}
    for line in os_release.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"").lower()
    words = [values.get("ID", "")] + values.get("ID_LIKE", "").split()
    for word in words:
        if word in FAMILIES:
            return FAMILIES[word]
        if word.startswith("opensuse"):
            return "suse"
    return None


def install_command(missing: list[str], family: str | None) -> tuple[str | None, list[str]]:
    """(the install command, the sonames no package is known for); the command is None without a
    known distribution or package."""
    if family is None or family not in MANAGERS:
        return None, list(missing)
    _name, command, column = MANAGERS[family]
    packages = list(dict.fromkeys(PACKAGES[so][column] for so in missing if so in PACKAGES))
    unknown = [so for so in missing if so not in PACKAGES]
    return (f"{command} {' '.join(packages)}" if packages else None), unknown


def advice(missing: list[str], family: str | None) -> str:
    """What to tell the user: the missing libraries and the command that installs them."""
    command, unknown = install_command(missing, family)
    lines = [
        "Video Trainer's window cannot open: Qt's X11 platform plugin needs system libraries that are "
        f"missing here: {', '.join(missing)}.",
    ]
    if command:
        lines += ["Install them with:", f"    {command}"]
    if unknown or not command:
        names = ", ".join(unknown or missing)
        lines.append(f"Install the package that provides {names} with your distribution's package manager "
                     "(e.g. 'apt-file search NAME' or 'dnf provides NAME' finds it).")
    lines.append("Then start Video Trainer again.")
    return "\n".join(lines)


def find_plugin() -> Path | None:
    """PySide6's libqxcb.so, found without importing Qt (None if PySide6 is not installed)."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        plugin = Path(folder) / PLUGIN
        if plugin.is_file():
            return plugin
    return None


def run_ldd(plugin: Path) -> str | None:
    """ldd's output for the plugin, or None where ldd is not there or fails."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    try:
        result = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("ldd failed: %s", e)
        return None
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ldd-output", type=Path, help="read ldd's output from this file instead of running ldd")
    parser.add_argument("--os-release", type=Path, default=Path("/etc/os-release"), help="the distribution's os-release file")
    parser.add_argument("--plugin", type=Path, help="the platform plugin to check (default: PySide6's libqxcb.so)")
    args = parser.parse_args(argv)

    if args.ldd_output is not None:
        output = args.ldd_output.read_text(encoding="utf-8", errors="replace")
    else:
        if not sys.platform.startswith("linux"):
            return EXIT_OK
        plugin = args.plugin or find_plugin()
        if plugin is None:
            return EXIT_OK  # no PySide6 (yet): the install reports that in its own words
        found = run_ldd(plugin)
        if found is None:
            return EXIT_OK  # cannot tell; Qt will say what it misses
        output = found
    missing = missing_libraries(output)
    if not missing:
        return EXIT_OK
    try:
        os_release = args.os_release.read_text(encoding="utf-8", errors="replace")
    except OSError:
        os_release = ""
    print(advice(missing, distribution_family(os_release)))
    return EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
