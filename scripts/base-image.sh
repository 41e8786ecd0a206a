#!/usr/bin/env bash
# Makes sure the Dockerfile's base image (python:3.11-slim) is present locally.
#
# 1. If the image is already in local storage, nothing is done (the script is idempotent).
# 2. Otherwise it is pulled from its registry.
# 3. If that fails (an air-gapped machine, or no route to Docker Hub), a stand-in is built
#    from Debian packages with debootstrap and imported under the same name, so that the
#    Dockerfile's `FROM python:3.11-slim` resolves without a registry:
#      Debian bookworm (minbase) + python3 (3.11), python3-venv, python3-pip, ca-certificates;
#      the host's extra CA certificates (/usr/local/share/ca-certificates) are trusted, so pip
#      inside the build works behind a TLS-inspecting proxy or against an internal index;
#      `python` and `pip` on /usr/local/bin, as in the official image.
#    Needs root, debootstrap and a Debian mirror (an internal one works: DEBIAN_MIRROR).
#
# Environment:
#   BASE_IMAGE      the name to provide (default docker.io/library/python:3.11-slim)
#   DEBIAN_MIRROR   the Debian archive (default: the first URI in this host's apt sources)
#   DEBIAN_SUITE    default bookworm, whose python3 is 3.11
#   CONTAINER_ENGINE  podman (default when installed) or docker
#
# About 45 s on 2 cores, most of it debootstrap; the stand-in is about 150 MB.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"

DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"

if image_exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE: present"
    exit 0
fi

echo "base image $BASE_IMAGE: not present; pulling"
if timeout 300 "$CONTAINER_ENGINE" pull "$BASE_IMAGE"; then
    exit 0
fi

echo "base image $BASE_IMAGE: pull failed; building a stand-in with debootstrap"
if [[ $EUID -ne 0 ]]; then
    echo "error: debootstrap needs root (or pull $BASE_IMAGE from a reachable registry)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "error: debootstrap is not installed (apt-get install -y debootstrap)" >&2
    exit 1
fi

debian_mirror() {
    # The mirror this host already uses is the one known to be reachable from it.
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(debian_mirror)}"

rootfs="$(mktemp -d /var/tmp/seq2serve-base.XXXXXX)"
cleanup() {
    # debootstrap mounts proc and sys inside the tree; unmount before deleting, and never
    # let rm cross into another file system.
    umount "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

timeout 1200 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR"

shopt -s nullglob
extra_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
if ((${#extra_cas[@]})); then
    cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
fi

# The official image's Python is not distribution-managed: pip may install into it.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
# What a slim image leaves out: package lists, downloaded packages, documentation, translations.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log

tar -C "$rootfs" -c . | "$CONTAINER_ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE_IMAGE"
echo "base image $BASE_IMAGE: built from Debian $DEBIAN_SUITE ($DEBIAN_MIRROR) in ${SECONDS} s"
