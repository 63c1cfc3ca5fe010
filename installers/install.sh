#!/usr/bin/env bash
# Video Trainer installer for Linux.
#
#   installers/install.sh                 install (or repair) into .venv and add a menu entry
#   installers/install.sh --detect        print the PyTorch build this machine would get, then exit
#   installers/install.sh --desktop-only  only (re)write the desktop menu entry
#
# Settings (environment variables):
#   VIDEO_TRAINER_PYTHON         Python to create .venv with (default: python3, python3.13 ... python3.10)
#   VIDEO_TRAINER_TORCH          auto | cuda | rocm | cpu   (default auto: NVIDIA, then AMD, else CPU)
#   VIDEO_TRAINER_TORCH_INDEX    a pip index URL for torch, used as-is (a mirror, or another CUDA build)
#   VIDEO_TRAINER_TORCH_VERSION  torch version to install (default: the tested release), or "latest"
#   VIDEO_TRAINER_NO_DESKTOP     1 = do not write the desktop menu entry
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # started as "sh install.sh"
set -euo pipefail

# Keep these in step with installers/install.bat; tests/test_install_windows.py compares them.
# Driver CUDA version (the "CUDA Version" nvidia-smi prints) -> PyTorch wheel index, newest first.
CUDA_TABLE="13.0:cu130 12.8:cu128 12.6:cu126 12.4:cu124"
ROCM_TAG="rocm6.4"
# The torch release the app is tested with (same as constraints/test-cpu.txt).
TORCH_VERSION_DEFAULT="2.13.0"
TORCH_INDEX_BASE="https://download.pytorch.org/whl"

# --------------------------------------------------------------------------- setup

MODE=install
case "${1:-}" in
    "") ;;
    --detect) MODE=detect ;;
    --desktop-only) MODE=desktop ;;
    -h|--help)
        # Print the comment block at the top of this file.
        while IFS= read -r line; do
            [[ $line == '#!'* ]] && continue
            [[ $line == '#'* ]] || break
            line=${line#\#}; printf '%s\n' "${line# }"
        done <"${BASH_SOURCE[0]}"
        printf '\nTested torch release: %s. CUDA builds by driver version: %s\n' "$TORCH_VERSION_DEFAULT" "$CUDA_TABLE"
        exit 0 ;;
    *)
        echo "Unknown option: $1 (try --help)" >&2
        exit 2 ;;
esac

# The project root is the parent of this script's folder, wherever we are started from.
# Only bash builtins here: --detect must run with a PATH holding nothing but fake tools.
SCRIPT_PATH=${BASH_SOURCE[0]}
[[ $SCRIPT_PATH == */* ]] || SCRIPT_PATH=./$SCRIPT_PATH
SCRIPT_DIR=$(cd -- "${SCRIPT_PATH%/*}" && pwd -P)
ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
cd -- "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.video-trainer-installed"

say()  { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$1" >&2; shift; local l; for l in "$@"; do printf '         %s\n' "$l" >&2; done; }
die()  {
    printf '\nERROR: %s\n' "$1" >&2; shift
    local l; for l in "$@"; do printf '       %s\n' "$l" >&2; done
    exit 1
}

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && $MODE == install ]]; then
        printf '\nThe installation did not finish (exit code %s). Video Trainer is not marked as\n' "$rc" >&2
        printf 'installed, so running installers/install.sh or installers/start.sh again retries it.\n' >&2
    fi
}
trap on_exit EXIT

# --------------------------------------------------------------------------- detection

# Prints the index tag for a driver CUDA version such as "12.8"; fails if the driver is too old.
cuda_tag_for() {
    local have_major have_minor entry need tag need_major need_minor
    have_major=${1%%.*}
    have_minor=${1#*.}; [[ $have_minor == "$1" ]] && have_minor=0
    for entry in $CUDA_TABLE; do
        need=${entry%%:*}; tag=${entry#*:}
        need_major=${need%%.*}; need_minor=${need#*.}
        if (( 10#$have_major * 100 + 10#$have_minor >= 10#$need_major * 100 + 10#$need_minor )); then
            printf '%s\n' "$tag"
            return 0
        fi
    done
    return 1
}

newest_cuda_tag() { local first=${CUDA_TABLE%% *}; printf '%s\n' "${first#*:}"; }
oldest_cuda() { local last=${CUDA_TABLE##* }; printf '%s\n' "${last%%:*}"; }

find_nvidia_smi() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        command -v nvidia-smi
    elif [[ -x /usr/lib/wsl/lib/nvidia-smi ]]; then  # WSL2 puts it here, not always on PATH
        printf '%s\n' /usr/lib/wsl/lib/nvidia-smi
    else
        return 1
    fi
}

has_amd_gpu() {
    # /dev/kfd is the ROCm compute device node; rocminfo lists GPU agents as gfxNNNN.
    [[ -e /dev/kfd ]] && return 0
    local out
    command -v rocminfo >/dev/null 2>&1 && out=$(rocminfo 2>/dev/null) && [[ $out == *gfx* ]]
}

# Sets VARIANT (cuda|rocm|cpu|custom), TAG (cu128, rocm6.4, cpu, custom) and INDEX (a URL).
detect_torch() {
    local choice=${VIDEO_TRAINER_TORCH:-auto}
    choice=${choice,,}
    case $choice in
        auto|cuda|rocm|cpu) ;;
        *) die "VIDEO_TRAINER_TORCH=$VIDEO_TRAINER_TORCH is not one of: auto, cuda, rocm, cpu." ;;
    esac

    if [[ -n ${VIDEO_TRAINER_TORCH_INDEX:-} ]]; then
        INDEX=$VIDEO_TRAINER_TORCH_INDEX
        local last=${INDEX%/}; last=${last##*/}
        if [[ $last =~ ^(cu[0-9]+|rocm[0-9.]+|cpu)$ ]]; then TAG=$last; else TAG=custom; fi
        if [[ $choice != auto ]]; then
            VARIANT=$choice
        else
            case $TAG in
                custom) VARIANT=custom ;;
                cu*) VARIANT=cuda ;;
                rocm*) VARIANT=rocm ;;
                cpu) VARIANT=cpu ;;
                *) VARIANT=custom ;;
            esac
        fi
        return 0
    fi

    VARIANT=cpu TAG=cpu
    if [[ $choice == auto || $choice == cuda ]]; then
        local smi out
        if smi=$(find_nvidia_smi); then
            if out=$("$smi" 2>/dev/null); then
                if [[ $out =~ CUDA\ Version:\ *([0-9]+)\.([0-9]+) ]]; then
                    local cuda="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
                    TAG=$(cuda_tag_for "$cuda") || die \
                        "Your NVIDIA driver supports CUDA $cuda, but PyTorch needs CUDA $(oldest_cuda) or newer." \
                        "Update the NVIDIA driver (https://www.nvidia.com/drivers) and run this again," \
                        "or install without GPU support: VIDEO_TRAINER_TORCH=cpu installers/install.sh"
                    VARIANT=cuda
                else
                    die "nvidia-smi runs but does not report a CUDA version; the NVIDIA driver is probably too old." \
                        "Update the driver, or set VIDEO_TRAINER_TORCH=cpu (no GPU) or VIDEO_TRAINER_TORCH_INDEX."
                fi
            elif [[ $choice == auto ]]; then
                warn "nvidia-smi is installed but failed (driver not loaded? reboot after a driver update?)." \
                     "Not using the NVIDIA GPU. Set VIDEO_TRAINER_TORCH=cuda to install the CUDA build anyway."
            fi
        fi
        if [[ $choice == cuda && $VARIANT != cuda ]]; then
            TAG=$(newest_cuda_tag) VARIANT=cuda
            warn "VIDEO_TRAINER_TORCH=cuda but the CUDA version could not be read from nvidia-smi;" \
                 "using the newest build ($TAG). Set VIDEO_TRAINER_TORCH_INDEX to choose another."
        fi
    fi
    if [[ $VARIANT == cpu ]] && { [[ $choice == rocm ]] || { [[ $choice == auto ]] && has_amd_gpu; }; }; then
        VARIANT=rocm TAG=$ROCM_TAG
    fi
    INDEX="$TORCH_INDEX_BASE/$TAG"
}

# --------------------------------------------------------------------------- desktop entry

# Quote one argument for the Exec key (Desktop Entry spec: inside double quotes, \ " ` $ are
# escaped with a backslash, and the key's string escaping doubles each backslash again).
desktop_exec_arg() {
    local s=$1 bs='\'
    s=${s//"$bs"/"$bs$bs$bs$bs"}
    s=${s//'"'/"$bs$bs"'"'}
    s=${s//'`'/"$bs$bs"'`'}
    s=${s//'$'/"$bs$bs"'$'}
    s=${s//'%'/'%%'}
    printf '"%s"' "$s"
}

write_desktop_entry() {
    if [[ ${VIDEO_TRAINER_NO_DESKTOP:-0} == 1 ]]; then
        note "Skipping the desktop menu entry (VIDEO_TRAINER_NO_DESKTOP=1)."
        return 0
    fi
    local data_home=${XDG_DATA_HOME:-}
    if [[ -z $data_home ]]; then
        [[ -n ${HOME:-} ]] || { warn "Neither XDG_DATA_HOME nor HOME is set; skipping the desktop menu entry."; return 0; }
        data_home="$HOME/.local/share"
    fi
    local apps="$data_home/applications"
    local target="$apps/video-trainer.desktop"
    local template="$SCRIPT_DIR/video-trainer.desktop.in"
    [[ -f $template ]] || die "Missing $template; the project files are incomplete. Download Video Trainer again."

    local bs='\' exec_value icon_value content
    exec_value=$(desktop_exec_arg "$ROOT/installers/start.sh")
    icon_value=${ROOT//"$bs"/"$bs$bs"}/resources/icon.png
    content=$(<"$template")
    content=${content//@EXEC@/"$exec_value"}
    content=${content//@ICON@/"$icon_value"}

    mkdir -p -- "$apps" || die "Cannot create $apps."
    # Write next to the target, then rename: a menu never sees a half-written file.
    local tmp="$apps/.video-trainer.desktop.tmp.$$"
    printf '%s\n' "$content" >"$tmp" && mv -f -- "$tmp" "$target" \
        || { rm -f -- "$tmp"; die "Cannot write $target."; }
    # Menus pick up new entries faster with this; harmless where it is missing.
    command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$apps" 2>/dev/null || true
    note "Menu entry: $target"
}

# --------------------------------------------------------------------------- install steps

find_python() {
    local c candidates
    if [[ -n ${VIDEO_TRAINER_PYTHON:-} ]]; then
        candidates=("$VIDEO_TRAINER_PYTHON")
    else
        candidates=(python3 python3.13 python3.12 python3.11 python3.10 python)
    fi
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            PYTHON=$(command -v "$c")
            return 0
        fi
    done
    if [[ -n ${VIDEO_TRAINER_PYTHON:-} ]]; then
        die "VIDEO_TRAINER_PYTHON=$VIDEO_TRAINER_PYTHON is not a working Python 3.10 or newer."
    fi
    die "No Python 3.10 or newer found (tried ${candidates[*]})." \
        "Install one, e.g. Debian/Ubuntu: sudo apt install python3 python3-venv" \
        "                 Fedora:        sudo dnf install python3" \
        "or point the installer at one: VIDEO_TRAINER_PYTHON=/path/to/python3.12 installers/install.sh"
}

make_venv() {
    if [[ -x $VPY ]] && "$VPY" -c 'import sys' >/dev/null 2>&1; then
        note "Using the existing virtual environment in .venv"
        return 0
    fi
    find_python
    local clear=()
    if [[ -e $VENV ]]; then
        note ".venv exists but does not work (Python moved or upgraded?); recreating it."
        clear=(--clear)
    fi
    note "Creating .venv with $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    "$PYTHON" -m venv ${clear[@]+"${clear[@]}"} "$VENV" || die "Could not create the virtual environment in $VENV." \
        "On Debian/Ubuntu the venv module is a separate package: sudo apt install python3-venv" \
        "(or python3.X-venv for your Python version), then run this again."
}

# True if the index answers within a few seconds. pip would otherwise retry for minutes.
index_reachable() {
    [[ $1 == http://* || $1 == https://* ]] || return 0  # file:// and friends: let pip judge
    "$VPY" -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)' \
        "$1" >/dev/null 2>&1
}

installed_torch() {
    "$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}

install_torch() {
    local version=${VIDEO_TRAINER_TORCH_VERSION:-$TORCH_VERSION_DEFAULT}
    local spec=torch
    [[ $version == latest ]] || spec="torch==$version"

    # Keep a matching torch (re-runs are quick and work offline); replace one built for
    # another accelerator or version, since pip would call it "already satisfied".
    local have label=""
    have=$(installed_torch)
    TORCH_SOURCE="already installed"
    if [[ -n $have ]]; then
        [[ $have == *+* ]] && label=${have#*+}
        local ok=1
        [[ $version == latest || ${have%%+*} == "$version" ]] || ok=0
        if [[ $TAG != custom && $label != "$TAG" ]] && ! [[ $TAG == cpu && -z $label ]]; then ok=0; fi
        if (( ok )); then
            note "torch $have is already installed."
            return 0
        fi
        note "Replacing torch $have (wanted: $spec, build $TAG)."
        "$VPY" -m pip uninstall -y torch || die "Could not uninstall the old torch from .venv."
    fi

    TORCH_SOURCE=$INDEX
    if index_reachable "$INDEX"; then
        note "Downloading from $INDEX (CUDA and ROCm builds are several GB; this takes a while)."
        "$VPY" -m pip install --timeout 60 --index-url "$INDEX" "$spec" && return 0
        [[ $VARIANT == cpu ]] || die "Installing PyTorch ($spec, $TAG) from $INDEX failed; see pip's message above." \
            "If that index has no $spec for your Python, try VIDEO_TRAINER_TORCH_VERSION=latest." \
            "Without a GPU build you can still install: VIDEO_TRAINER_TORCH=cpu installers/install.sh"
        warn "Installing from $INDEX failed; trying pip's default index instead."
    elif [[ $VARIANT == cpu ]]; then
        warn "$INDEX cannot be reached; installing torch from pip's default index instead." \
             "(On x86-64 Linux the torch on PyPI is the CUDA build: larger, but it runs on CPU too.)"
    else
        # pip may have a proxy configured that Python's urllib does not know about: let it try.
        warn "$INDEX could not be reached (10 s check); trying anyway with pip."
        "$VPY" -m pip install --timeout 20 --retries 1 --index-url "$INDEX" "$spec" && return 0
        die "Cannot download the PyTorch $TAG build from $INDEX." \
            "Check the internet connection or proxy (pip uses HTTPS_PROXY), or set" \
            "VIDEO_TRAINER_TORCH_INDEX to a mirror of that index. Without GPU support:" \
            "VIDEO_TRAINER_TORCH=cpu installers/install.sh"
    fi
    TORCH_SOURCE="pip's default index"
    "$VPY" -m pip install "$spec" || die "Installing PyTorch ($spec) from pip's default index failed; see pip's message above." \
        "Check the internet connection, or set VIDEO_TRAINER_TORCH_INDEX to a reachable index."
}

# pip also looks in find-links and extra-index-url from pip.conf, so a GPU install can end
# up with another build; say so rather than leave the user wondering why the GPU is unused.
check_torch_build() {
    local label=""
    [[ $TORCH_INSTALLED == *+* ]] && label=${TORCH_INSTALLED#*+}
    if [[ $VARIANT != cpu && $TAG != custom && $label != "$TAG" ]]; then
        warn "torch $TORCH_INSTALLED was installed, not the $TAG build that was asked for" \
             "(pip may have taken it from find-links or extra-index-url in your pip configuration)." \
             "The GPU may not be used. Check 'pip config list', then run installers/install.sh again."
    fi
}

check_disk_space() {
    local avail
    # Portable df output: 4th column of the 2nd line is free KiB.
    avail=$(df -Pk -- "$ROOT" 2>/dev/null | { read -r _; read -r _ _ _ a _; printf '%s' "${a:-}"; }) || return 0
    [[ $avail =~ ^[0-9]+$ ]] || return 0
    local need_gb=3
    [[ $VARIANT == cpu ]] || need_gb=12
    if (( avail < need_gb * 1024 * 1024 )); then
        warn "Only $((avail / 1024 / 1024)) GB free in $ROOT; the $VARIANT install needs about $need_gb GB."
    fi
}

# --------------------------------------------------------------------------- main

detect_torch
if [[ $MODE == detect ]]; then
    printf '%s %s %s\n' "$VARIANT" "$TAG" "$INDEX"
    exit 0
fi
if [[ $MODE == desktop ]]; then
    write_desktop_entry
    exit 0
fi

say "Installing Video Trainer in $ROOT"
note "PyTorch build: $VARIANT ($TAG) from $INDEX"
# Cleared first and written last, so an interrupted install is redone by start.sh.
rm -f -- "$STAMP"
check_disk_space

say "[1/5] Python virtual environment"
make_venv

say "[2/5] Updating pip"
"$VPY" -m pip install --upgrade pip >/dev/null 2>&1 || note "Could not update pip; continuing with the one in .venv."

say "[3/5] PyTorch ($VARIANT)"
install_torch
TORCH_INSTALLED=$(installed_torch)
[[ -n $TORCH_INSTALLED ]] || die "torch is not importable after installing it; see the messages above."
check_torch_build

say "[4/5] Video Trainer and its other dependencies"
# Pin the torch just installed so no dependency can swap it for another build from PyPI.
printf 'torch==%s\n' "$TORCH_INSTALLED" >"$VENV/torch-constraint.txt"
"$VPY" -m pip install --constraint "$VENV/torch-constraint.txt" -e "$ROOT" \
    || die "Installing Video Trainer's dependencies failed; see pip's message above." \
           "Check the internet connection and free disk space, then run installers/install.sh again."

# The window's system libraries (Qt's xcb plugin): the command for what is missing, not a failure.
qt_rc=0
qt_advice=$("$VPY" "$ROOT/installers/qt_libs.py") || qt_rc=$?
if (( qt_rc == 3 )); then
    warn "Some system libraries the window needs are missing; the rest of the install is fine."
    printf '%s\n' "$qt_advice" >&2
fi

say "[5/5] Desktop menu entry"
write_desktop_entry

printf 'torch=%s variant=%s from=%s\n' "$TORCH_INSTALLED" "$VARIANT" "$TORCH_SOURCE" >"$STAMP"
if [[ ${VIDEO_TRAINER_NO_DESKTOP:-0} == 1 ]]; then
    say "Done. Start Video Trainer with: $ROOT/installers/start.sh"
else
    say "Done. Start Video Trainer from your applications menu, or run: $ROOT/installers/start.sh"
fi
