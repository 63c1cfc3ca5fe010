#!/usr/bin/env bash
# Start Video Trainer. Runs installers/install.sh first when the install is missing or did
# not finish (no .venv/.video-trainer-installed). Arguments are passed on to main.py.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # started as "sh start.sh"
set -euo pipefail

# Follow a symlink (e.g. ~/bin/video-trainer -> .../installers/start.sh) to the real project.
src=${BASH_SOURCE[0]}
if resolved=$(readlink -f -- "$src" 2>/dev/null) && [[ -n $resolved ]]; then src=$resolved; fi
[[ $src == */* ]] || src=./$src
ROOT=$(cd -- "${src%/*}/.." && pwd -P)
cd -- "$ROOT"

notify() { command -v notify-send >/dev/null 2>&1 && notify-send -i "$ROOT/resources/icon.png" "Video Trainer" "$1" || true; }

if [[ ! -f .venv/.video-trainer-installed ]]; then
    if [[ -t 1 ]]; then
        echo "Video Trainer is not installed yet (or the last install did not finish); installing first."
        bash installers/install.sh || exit $?
    else
        # Started from the desktop menu: there is no terminal to show progress in, so the
        # output goes to the app's log folder (platformdirs.user_log_dir("VideoTrainer")).
        log_dir="${XDG_STATE_HOME:-$HOME/.local/state}/VideoTrainer/log"
        mkdir -p -- "$log_dir"
        log="$log_dir/install.log"
        notify "Installing Video Trainer; this can take several minutes. Progress: $log"
        if ! bash installers/install.sh >"$log" 2>&1; then
            notify "Installation failed. See $log, or run $ROOT/installers/install.sh in a terminal."
            exit 1
        fi
    fi
fi

# Opening the window on X11: say which system libraries Qt's xcb plugin lacks and the command that
# installs them (installers/qt_libs.py), instead of Qt's "no Qt platform plugin could be initialized".
opens_window() {
    [[ $# -eq 0 || $1 == gui ]] || return 1
    local a
    for a in "$@"; do [[ $a == -h || $a == --help || $a == --screenshot* ]] && return 1; done
    return 0
}
if [[ -n ${DISPLAY:-} ]] && opens_window "$@"; then
    rc=0
    advice=$("$ROOT/.venv/bin/python" "$ROOT/installers/qt_libs.py") || rc=$?
    if (( rc == 3 )); then  # libraries missing: the advice names them and the install command
        printf '%s\n' "$advice" >&2
        [[ -t 2 ]] || notify "$advice"
        # On Wayland Qt may still open the window with its wayland plugin; on X11 it cannot.
        [[ -n ${WAYLAND_DISPLAY:-} ]] || exit 1
    fi
fi

exec "$ROOT/.venv/bin/python" "$ROOT/main.py" "$@"
