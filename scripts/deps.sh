#!/usr/bin/env bash
# Installs the system packages that a make target needs, before anything is compiled.
#
#   scripts/deps.sh TARGET     TARGET: build, lint, demo, test, e2e, bench, fuzz, release, image,
#                              deps (= test)
#
# On Debian or Ubuntu, as root: checks each package with dpkg-query and installs only the
# missing ones with apt-get, printing one line that says what and why. Not root, or not a
# Debian-like system, with something missing: prints the packages and the apt-get line that
# would install them, and exits 1. Targets that create network namespaces also need root.
# Set ISTIO_CNI_SKIP_DEPS=1 to skip all of this (packages installed by other means).
# Exit codes: 0 ready; 1 something is missing or apt-get failed (its output is shown).
set -euo pipefail

target=${1:?usage: scripts/deps.sh build|lint|demo|test|e2e|bench|fuzz|release|image|deps}

# Each package, with the reason it is needed (shown when it is installed).
declare -A why=(
    [gcc]="C compiler and linker for the Rust build (ring, the final link)"
    [libc6-dev]="C library headers and objects for the link"
    [ca-certificates]="cargo fetches crates over TLS"
    [iptables]="the rules are written and read back with iptables-restore/-save"
    [nftables]="nft: the nftables backend's transactions are applied and read back in test netns"
    [iproute2]="the tests and the demo create network namespaces with ip"
    [containernetworking-plugins]="the reference CNI plugins (loopback, bridge, host-local) of the chain"
    [protobuf-compiler]="protoc, to build the containerd CRI client used by the tests"
    [containerd]="the real container runtime of the end-to-end tests"
    [runc]="containerd's OCI runtime"
    [busybox-static]="the offline pause image of the end-to-end tests"
    [python3]="the Helm chart's tests"
    [python3-venv]="the chart's pinned Python tools (Helm's engine) go into .venv: chart tests, and e2e renders the chart"
    [g++]="libFuzzer (built by the libfuzzer-sys crate) is C++"
    [file]="the tests check that the shipped plugin is statically linked"
    [mmdebstrap]="the image's root file system, from Debian packages"
    [umoci]="packs the image as an OCI layout, without a daemon"
    [util-linux]="unshare: test nodes are mount and PID namespaces"
    [mount]="mount: tmpfs and overlays that lay out a test node's root"
)
base=(gcc libc6-dev ca-certificates)
netns=(iptables nftables iproute2 containernetworking-plugins)
cri=(protobuf-compiler containerd runc busybox-static util-linux mount)
case "$target" in
    build) pkgs=("${base[@]}" protobuf-compiler); need_root=false ;;
    lint) pkgs=("${base[@]}" protobuf-compiler); need_root=false ;;
    demo) pkgs=("${base[@]}" "${netns[@]}"); need_root=true ;;
    bench) pkgs=("${base[@]}" "${netns[@]}" file); need_root=true ;;
    e2e) pkgs=("${base[@]}" "${netns[@]}" "${cri[@]}" python3 python3-venv file mmdebstrap umoci); need_root=true ;;
    image) pkgs=("${base[@]}" file mmdebstrap umoci); need_root=true ;;
    test | deps) pkgs=("${base[@]}" "${netns[@]}" "${cri[@]}" python3 python3-venv file); need_root=true ;;
    release) pkgs=("${base[@]}" file); need_root=false ;;
    fuzz) pkgs=("${base[@]}" g++); need_root=false ;;
    *)
        echo "scripts/deps.sh: unknown target '$target' (build, lint, demo, test, e2e, bench, fuzz, release, image)" >&2
        exit 2
        ;;
esac

die() {
    echo "make $target: $*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 ||
    die "Rust's cargo is not on PATH; install a Rust toolchain (rustup, stable, 1.85 or later) and run it again."

if [ "$target" = fuzz ] && ! rustup run nightly rustc --version >/dev/null 2>&1; then
    die "cargo fuzz needs a nightly Rust toolchain (rustup toolchain install nightly)."
fi

[ "${ISTIO_CNI_SKIP_DEPS:-}" = 1 ] && exit 0

apt_line="apt-get install --no-install-recommends ${pkgs[*]}"
debian_like=false
if [ -r /etc/os-release ] && command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # shellcheck disable=SC1091
    . /etc/os-release
    case " ${ID:-} ${ID_LIKE:-} " in *" debian "* | *" ubuntu "*) debian_like=true ;; esac
fi
if ! $debian_like; then
    die "this is not a Debian-like system, so its packages cannot be checked here. It needs the equivalents of: ${pkgs[*]} (on Debian: $apt_line). Install them, then run it again with ISTIO_CNI_SKIP_DEPS=1."
fi

missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] ||
        die "missing Debian packages: ${missing[*]}. As root: apt-get update && apt-get install --no-install-recommends ${missing[*]}"
    reasons=""
    for p in "${missing[@]}"; do reasons+="${reasons:+; }$p: ${why[$p]}"; done
    echo "make $target: installing ${missing[*]} with apt-get ($reasons)"
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get failed (output above); nothing was built."
    fi
fi

if $need_root && [ "$(id -u)" != 0 ]; then
    die "it needs root: it creates network namespaces and writes iptables rules in them."
fi
