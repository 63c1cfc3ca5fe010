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
        notify() { command -v notify-send >/dev/null 2>&1 && notify-send -i "$ROOT/resources/icon.png" "Video Trainer" "$1" || true; }
        notify "Installing Video Trainer; this can take several minutes. Progress: $log"
        if ! bash installers/install.sh >"$log" 2>&1; then
            notify "Installation failed. See $log, or run $ROOT/installers/install.sh in a terminal."
            exit 1
        fi
    fi
fi

exec "$ROOT/.venv/bin/python" "$ROOT/main.py" "$@"
