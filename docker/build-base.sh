#!/usr/bin/env bash
# Builds a minimal Debian bookworm image with Python 3.11 from Debian's package mirror and
# imports it into the local Docker engine. For machines that cannot pull from an image
# registry (air-gapped hospitals, CI sandboxes): pass the result as the Dockerfile's
# BASE_IMAGE build argument. Skips the work when the image already exists.
#
#   docker/build-base.sh [IMAGE]        (default fedsite-base:bookworm; needs root)
#   FEDSITE_DEBIAN_MIRROR=http://mirror/debian docker/build-base.sh
set -euo pipefail

image="${1:-fedsite-base:bookworm}"
mirror="${FEDSITE_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  # Use the mirror apt already uses on this machine, so that no new network path is needed.
  mirror="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list.d/*.list 2>/dev/null | grep -m1 -E '/debian/?$' | awk '{print $2}' || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists: skipping the build"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { echo "debootstrap is required: apt-get install -y debootstrap" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

rootfs="$(mktemp -d /tmp/fedsite-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror"
# The image only needs to run Python; apt caches, docs and locales are dead weight.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image"
echo "imported $image"
