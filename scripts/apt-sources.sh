# Sourced by the scripts that run mmdebstrap: sets `sources` to the machine's own apt
# sources files (one-line or deb822, wherever apt keeps them), to pass as mirrors.
# Exits 1 when there are none.
sources=()
shopt -s nullglob
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
done
shopt -u nullglob
[ ${#sources[@]} -gt 0 ] || { echo "no apt sources in /etc/apt: cannot pick a mirror" >&2; exit 1; }
