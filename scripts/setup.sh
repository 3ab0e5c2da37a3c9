#!/usr/bin/env bash
# Install what ringfence, its tests, its demo and its benchmarks need on Debian 12 (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 qemu-utils busybox-static cpio kmod libcap-dev fio gcc systemd procps strace iproute2)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
