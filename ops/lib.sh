# Shared by the ops/ scripts (sourced, not run): where the checkout is, messages, the OS check.
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
RUCHER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUCHER_VENV="$RUCHER_ROOT/.venv"
RUCHER_PYTHON="$RUCHER_VENV/bin/python"

say() { printf '%s: %s\n' "${0##*/}" "$*"; }
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# require_debian12: stop with a clear message unless this machine runs Debian 12. It reads
# $RUCHER_OS_RELEASE if set (tests point it at a fake file), else /etc/os-release.
require_debian12() {
    local file="${RUCHER_OS_RELEASE:-/etc/os-release}"
    local key value id="" version="" pretty=""
    [[ -r "$file" ]] || die "cannot read $file; Rucher's ops/ scripts support Debian 12 (bookworm) only"
    while IFS='=' read -r key value; do
        value="${value#[\"\']}"
        value="${value%[\"\']}"
        case "$key" in
            ID) id="$value" ;;
            VERSION_ID) version="$value" ;;
            PRETTY_NAME) pretty="$value" ;;
        esac
    done <"$file"
    if [[ "$id" != debian || "$version" != 12 ]]; then
        die "Rucher's ops/ scripts support Debian 12 (bookworm) only; this machine runs" \
            "'${pretty:-${id:-unknown} ${version}}' (read from $file)"
    fi
}

# as_root CMD...: run CMD as root, through sudo when needed.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run: $* (no sudo found)"
    fi
}
