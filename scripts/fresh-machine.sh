#!/usr/bin/env bash
# Runs make targets as a new user would, on a fresh Debian 12: a minimal root file system
# from mmdebstrap (the host's own apt sources as the mirror), a clean clone of this
# repository in it, the host's Rust toolchain bind-mounted read-only with an empty cargo
# cache, and nothing else installed (not even make, which the script installs first, as
# the README asks the user to). Each command is timed.
#
#   scripts/fresh-machine.sh ROOT 'make demo' 'make test' ...
#
# ROOT must not exist; it is removed at the end (set KEEP_ROOT=1 to keep it). Needs root and
# mmdebstrap. The host's extra CA certificates (/usr/local/share/ca-certificates) are copied
# in, as a new machine on the same site would have them; everything else comes from the
# package managers.
set -euo pipefail

root=${1:?usage: scripts/fresh-machine.sh ROOT COMMAND...}
shift
[ $# -gt 0 ] || set -- "make demo" "make test"
[ ! -e "$root" ] || { echo "$root exists; pick a new directory" >&2; exit 2; }
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)

# The machine's own apt sources (sets `sources`).
. "$(dirname "$(readlink -f "$0")")/apt-sources.sh"

mounts=()
cleanup() {
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount -R "${mounts[$i]}" 2>/dev/null || umount -lR "${mounts[$i]}" 2>/dev/null || true
    done
    [ "${KEEP_ROOT:-}" = 1 ] || rm -rf --one-file-system "$root"
}
trap cleanup EXIT

mmdebstrap --quiet --variant=minbase bookworm "$root" "${sources[@]}"
cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/resolv.conf "$root/etc/resolv.conf"
git clone --quiet --no-local "$repo" "$root/src"
# The root must be a mount point, as on a machine: `ip netns exec` remounts / as a slave.
mount --bind "$root" "$root" && mounts+=("$root")

bind() { # bind SRC DST [ro]
    mkdir -p "$root$2"
    mount --rbind "$1" "$root$2"
    mounts+=("$root$2")
    [ "${3:-}" != ro ] || mount -o remount,bind,ro "$root$2"
}
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
bind /sys /sys
bind /dev /dev
mount -t tmpfs tmpfs "$root/run" && mounts+=("$root/run")
bind "${RUSTUP_HOME:-$HOME/.rustup}" /root/.rustup ro
bind "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin ro

# The root becomes the root of a mount namespace of its own (pivot_root, not chroot), as
# on a machine: entering a mount namespace (the agent's self-test enters its node's)
# resets the root to that namespace's, which a chroot would not survive.
in_root() {
    unshare --mount --propagation private -- /bin/sh -c \
        'cd "$1" && mkdir -p .oldroot && pivot_root . .oldroot && cd / && umount -l /.oldroot && rmdir /.oldroot && shift && exec "$@"' \
        sh "$root" /usr/bin/env -i HOME=/root TERM=dumb \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo RUSTUP_AUTO_INSTALL=0 \
        SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        /bin/bash -c "cd /src && $1"
}

echo "== fresh root $root: $(in_root 'command -v make || echo no make')"
in_root 'apt-get update -qq && apt-get install -y -qq --no-install-recommends make >/dev/null'
for cmd in "$@"; do
    echo "== $cmd"
    start=$(date +%s)
    rc=0
    in_root "$cmd" || rc=$?
    echo "== $cmd: exit $rc after $(($(date +%s) - start)) s"
    [ $rc = 0 ] || exit $rc
done
