#!/usr/bin/env bash
# make image: the node agent's OCI image, from Debian packages only, with no registry and no
# daemon. mmdebstrap extracts iptables, nftables, CA certificates and their libraries (the
# host's own apt sources are the mirror), everything not needed at run time is removed,
# the two release binaries go to /usr/local/bin, and umoci packs the root into an OCI image
# layout, tarred as target/image/istio-cni-node-agent-<version>.oci.tar. The last line
# printed is the image manifest's digest (also written to OUT_DIR/digest).
#
# Reproducible: SOURCE_DATE_EPOCH (default: the last commit's time) fixes every timestamp
# (files, layer, config, history, the tar), so two builds of one commit with the same
# package versions give the same digest.
#
#   scripts/image.sh [OUT_DIR]          (default target/image; needs root, mmdebstrap, umoci)
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir=${1:-target/image}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' node-agent/Cargo.toml | head -n 1)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
name=istio-cni-node-agent
tag=$version
plugin=target/x86_64-unknown-linux-gnu/release/istio-cni
agent=target/release/istio-cni-node-agent
for b in "$plugin" "$agent"; do
    [ -x "$b" ] || { echo "image: $b is missing; run make release first" >&2; exit 1; }
done
# The machine's own apt sources (sets `sources`).
. "$(dirname "$(readlink -f "$0")")/apt-sources.sh"

work=$(mktemp -d)
trap 'rm -rf --one-file-system "$work"' EXIT
root=$work/rootfs

# 1. The packages, extracted (no maintainer scripts run: nothing of apt or dpkg is needed
#    at run time).
mmdebstrap --quiet --variant=extract --include=iptables,nftables,ca-certificates,libgcc-s1 \
    bookworm "$root" "${sources[@]}"

# 2. What the maintainer scripts would have made: the iptables alternatives (Debian's
#    default, the nft backend) and the CA bundle (update-ca-certificates concatenates the
#    Mozilla set).
for t in iptables ip6tables; do
    for s in "" -save -restore; do ln -sfn "$t-nft$s" "$root/usr/sbin/$t$s"; done
done
mkdir -p "$root/etc/ssl/certs"
find "$root/usr/share/ca-certificates/mozilla" -name '*.crt' -print0 | sort -z |
    xargs -0 cat >"$root/etc/ssl/certs/ca-certificates.crt"

# 3. Everything not needed at run time: package metadata, docs, man pages, debconf and its
#    perl modules, openssl (iptables, nft and the agent do not use it), iconv modules.
rm -rf "$root"/var/lib/apt "$root"/var/lib/dpkg "$root"/var/cache "$root"/var/log \
    "$root"/etc/apt "$root"/etc/dpkg "$root"/usr/share/doc "$root"/usr/share/man \
    "$root"/usr/share/info "$root"/usr/share/locale "$root"/usr/share/lintian \
    "$root"/usr/share/debconf "$root"/usr/share/perl5 "$root"/usr/share/bash-completion \
    "$root"/usr/share/ca-certificates "$root"/usr/lib/ssl "$root"/etc/ssl/openssl.cnf \
    "$root"/usr/bin/openssl "$root"/usr/bin/c_rehash "$root"/usr/bin/debconf* \
    "$root"/usr/sbin/dpkg-* "$root"/usr/sbin/update-ca-certificates \
    "$root"/usr/sbin/iptables-apply "$root"/usr/sbin/ip6tables-apply \
    "$root"/usr/lib/x86_64-linux-gnu/libssl.so* "$root"/usr/lib/x86_64-linux-gnu/libcrypto.so* \
    "$root"/usr/lib/x86_64-linux-gnu/engines-3 "$root"/usr/lib/x86_64-linux-gnu/ossl-modules \
    "$root"/usr/lib/x86_64-linux-gnu/gconv

# 4. The two binaries, side by side (the agent installs the plugin from beside itself).
install -D -m 0755 "$agent" "$root/usr/local/bin/istio-cni-node-agent"
install -D -m 0755 "$plugin" "$root/usr/local/bin/istio-cni"
mkdir -p "$root/tmp" && chmod 1777 "$root/tmp"

# 5. Fixed timestamps, then the OCI layout.
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
rm -rf "$work/bundle/rootfs"
mv "$root" "$work/bundle/rootfs"
umoci repack --image "$layout:$tag" --history.created="$created" \
    --history.created_by="scripts/image.sh (mmdebstrap + umoci)" "$work/bundle"
umoci config --image "$layout:$tag" --created="$created" --history.created="$created" \
    --author="istio-cni authors" \
    --config.entrypoint=/usr/local/bin/istio-cni-node-agent --config.cmd=run \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.label="org.opencontainers.image.title=$name" \
    --config.label="org.opencontainers.image.version=$version" \
    --config.label="org.opencontainers.image.licenses=Apache-2.0" \
    --config.label="org.opencontainers.image.source=https://github.com/istio-cni/istio-cni" \
    --config.label="org.opencontainers.image.description=Istio CNI node agent and plugin with built-in validation" \
    --config.label="org.opencontainers.image.created=$created"
umoci gc --layout "$layout"

# 6. The archive: sorted, owned by root, fixed times, so that its bytes are reproducible
#    too.
mkdir -p "$out_dir"
archive=$out_dir/$name-$version.oci.tar
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$layout" -cf "$archive" .
manifest=$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' "$layout/index.json" | head -n 1)
blobs=$layout/blobs/sha256
compressed=$(du -cb "$blobs"/* | tail -n 1 | cut -f1)
echo "image: $archive ($(du -b "$archive" | cut -f1) bytes; blobs $compressed bytes; layer uncompressed $(du -sb "$work/bundle/rootfs" | cut -f1) bytes)"
echo "image: $name:$tag, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"
echo "$manifest" >"$out_dir/digest"
echo "$manifest"
