#!/usr/bin/env bash
# netns-lab.sh: the front door of the grebe lab.
#
#   ./netns-lab.sh demo                 the main job: two sites joined by grebe, in the lab
#   ./netns-lab.sh test [pytest args]   every test (unit, simulation, lab); exit status is pytest's
#   ./netns-lab.sh up [TOPOLOGY]        bring a topology up and leave it running (default two-sites)
#   ./netns-lab.sh down                 tear the running lab down
#   ./netns-lab.sh exec NODE -- CMD...  run a command inside a lab node
#   ./netns-lab.sh list                 show lab namespaces and topologies
#   ./netns-lab.sh impair LINK ...      change a link's impairment on a running lab
#   ./netns-lab.sh clean                remove every gb-* namespace and lab process, whatever left them
#   ./netns-lab.sh bench [--quick] [--only NAME...]   throughput / RTT table against the anchors
#   ./netns-lab.sh bootstrap-vm         qemu, busybox and a Debian kernel for linux-vm nodes
#                                       (done by the lab itself the first time one boots)
#
# It checks for root, bootstraps on first use (.venv, pip, Debian packages), then hands over
# to Python: `python -m bridge.lab`. Nothing here touches the root namespace's addresses,
# routes or sysctls; everything lives in namespaces named gb-*.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
venv="$here/.venv"
py="$venv/bin/python"

die() { echo "netns-lab: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, TUN and nftables need it)"

# Debian packages the lab, its tests and the benchmark use as real peers and dissectors.
APT_PACKAGES=(iproute2 nftables iperf3 tshark tcpdump nginx-light curl openssh-server openssh-client
              wireguard-go wireguard-tools openvpn procps psmisc iputils-ping openssl python3-venv
              clang llvm libbpf-dev libbpf1)
# One command each package provides, to tell quickly whether it is installed.
APT_PROBES=(ip nft iperf3 tshark tcpdump nginx curl sshd ssh wireguard-go wg openvpn pkill fuser ping openssl
            clang llc)
# ...and files for packages without a command (libbpf-dev, libbpf1: the eBPF fast path).
APT_FILES=(/usr/include/bpf/bpf_helpers.h)

bootstrap_apt() {
    local missing=0 c
    for c in "${APT_PROBES[@]}"; do
        command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || { missing=1; break; }
    done
    for c in "${APT_FILES[@]}"; do [ -e "$c" ] || missing=1; done
    [ "$missing" -eq 1 ] || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing lab tools and no apt-get to install them: ${APT_PACKAGES[*]}"
    echo "netns-lab: installing Debian packages: ${APT_PACKAGES[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    # --no-install-recommends never pulls a kernel image; policy-rc.d keeps services from starting.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.grebe
    chmod +x /usr/sbin/policy-rc.d.grebe
    local had_policy=0
    [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ "$had_policy" -eq 1 ] || cp /usr/sbin/policy-rc.d.grebe /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${APT_PACKAGES[@]}" >&2
    [ "$had_policy" -eq 1 ] || rm -f /usr/sbin/policy-rc.d
    rm -f /usr/sbin/policy-rc.d.grebe
}

# Only for `kind = "linux-vm"` nodes (bridge/lab/vmimage.py runs `netns-lab.sh bootstrap-vm` on
# first use, so the plain lab never pays for these): software-emulated x86 guests, a static
# busybox for their initramfs, and a Debian kernel package with fou/ip_gre/ipip/sit modules,
# only downloaded into the image cache (never installed as the host's kernel).
VM_APT_PACKAGES=(qemu-system-x86 busybox-static)
VM_KERNEL_PACKAGE=linux-image-cloud-amd64

bootstrap_vm() {
    local cache="${GREBE_VM_CACHE:-$venv/grebe-vm}" pkg
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then
        echo "netns-lab: installing Debian packages for linux-vm nodes: ${VM_APT_PACKAGES[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "${VM_APT_PACKAGES[@]}" >&2 || {
            apt-get update -qq && apt-get install -y -qq --no-install-recommends "${VM_APT_PACKAGES[@]}" >&2; }
    fi
    mkdir -p "$cache"
    if ! ls "$cache"/linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then
        # The metapackage names the current kernel package; download that one file only.
        pkg="$(apt-cache depends "$VM_KERNEL_PACKAGE" | awk '/Depends: linux-image-/ {print $2; exit}')"
        [ -n "$pkg" ] || die "cannot resolve $VM_KERNEL_PACKAGE (apt-get update?)"
        echo "netns-lab: downloading $pkg into $cache (guest kernel, not installed)" >&2
        (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || die "apt-get download $pkg failed"
    fi
}

bootstrap_venv() {
    local stamp="$venv/.grebe-stamp" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local base
    base="$(command -v python3.11 || command -v python3)" || die "python3 (>= 3.11) not found"
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python >= 3.11 needed, found $("$base" -V)"
    echo "netns-lab: preparing $venv" >&2
    [ -x "$py" ] || "$base" -m venv "$venv"
    "$py" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
    echo "$want" > "$stamp"
}

cmd="${1:-help}"
case "$cmd" in
    help|-h|--help)
        sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
        exit 0 ;;
esac

# The eBPF fast path's object (bridge/ebpf/grebe_tc.c), built here from source with the
# distribution's clang; `grebe up` with datapath "auto" runs the Python path without it.
bootstrap_ebpf() {
    "$py" -m bridge.ebpf.build >/dev/null || echo "netns-lab: eBPF object not built (see above)" >&2
}

bootstrap_apt
bootstrap_venv
bootstrap_ebpf
export PATH="$venv/bin:$PATH"

case "$cmd" in
    bootstrap-vm)
        bootstrap_vm ;;
    test)
        shift
        exec "$py" -m bridge.lab test "$@" ;;
    *)
        exec "$py" -m bridge.lab "$@" ;;
esac
