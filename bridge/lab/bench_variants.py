"""The variants `./netns-lab.sh bench` measures: how each one joins site A to site B.

Rules:
- A variant only sets up and tears down the path between the two sites on the gateways
  (and, for the inspection table, a proxy and a client-side tunnel). Measuring is the
  runner's job (`bench.py`), the same for every variant, so rows are comparable.
- Every change goes through `Bench` (`bench.py`): netlink changes with pyroute2 inside the
  lab's namespaces, each registered with its undo; processes through `Bench.spawn`, which
  keeps their logs in the run's temp dir. `teardown()` undoes all of it, so variants run
  one after another in the same lab without leaking routes, devices or processes.
- Addresses: sites are 198.18.1.0/24 and 198.18.2.0/24 (2001:db8:1::/64, 2001:db8:2::/64),
  the WAN 198.18.0.0/24; each overlay gets its own 198.19.N.0/30 (N = variant number).
- A variant that cannot run here says why in `unavailable()` (missing tool, grebe not built
  yet); the run then shows "unavailable: <reason>" in its row instead of failing.

Adding a variant: subclass `Variant` (table "tunnel": measured with iperf3 and ping
client -> server; table "inspect": measured with curl downloads from the server's HTTP),
implement `setup()` (and `unavailable()` if it needs something optional), and append an
instance to `TUNNEL_VARIANTS` or `INSPECT_VARIANTS`. `inspect-userspace` and `inspect-kernel`
are placeholders there, waiting for grebe's inspection (bridge/inspect, bridge/tproxy).
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.lab.bench_lab import Bench

SERVER_V4 = "198.18.2.10"
SITE_A = ("198.18.1.0/24", "2001:db8:1::/64")
SITE_B = ("198.18.2.0/24", "2001:db8:2::/64")
WAN_A = ("198.18.0.1", "2001:db8::1")
WAN_B = ("198.18.0.2", "2001:db8::2")
WG_PORT = 51820
OVPN_PORT = 1194


class Variant:
    """One way of joining the sites. Subclasses set name/label/table and implement setup()."""

    name = ""
    label = ""
    table = "tunnel"  # "tunnel" or "inspect"

    def unavailable(self, b: Bench) -> str | None:
        """Why this variant cannot run here, or None if it can."""
        return None

    def setup(self, b: Bench) -> None:
        raise NotImplementedError

    def teardown(self, b: Bench) -> None:
        b.undo_all()


def _need(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"missing tool(s): {', '.join(missing)}" if missing else None


def plain_routes(b: Bench) -> None:
    """Route each remote site via the peer gateway's WAN address (no tunnel)."""
    for v4, v6, gw, peer in ((0, 1, "gw-a", WAN_B), (0, 1, "gw-b", WAN_A)):
        remote = SITE_B if gw == "gw-a" else SITE_A
        b.route(gw, remote[v4], gateway=peer[v4])
        b.route(gw, remote[v6], gateway=peer[v6])


class Plain(Variant):
    name, label = "plain", "plain routed (the limit)"

    def setup(self, b: Bench) -> None:
        plain_routes(b)


class Vxlan(Variant):
    name, label = "vxlan", "kernel VXLAN over the WAN"
    ifname, vni = "gbb-vx0", 4242

    def setup(self, b: Bench) -> None:
        for gw, local, remote, me, peer, site in (
            ("gw-a", WAN_A[0], WAN_B[0], 1, 2, SITE_B),
            ("gw-b", WAN_B[0], WAN_A[0], 2, 1, SITE_A),
        ):
            b.link_add(gw, self.ifname, kind="vxlan", vxlan_id=self.vni, vxlan_local=local,
                       vxlan_group=remote, vxlan_port=4789, vxlan_link=b.ifindex(gw, "wan0"))
            b.addr(gw, self.ifname, f"198.19.0.{me}/30", f"2001:db8:ff00::{me}/64")
            b.route(gw, site[0], gateway=f"198.19.0.{peer}")
            b.route(gw, site[1], gateway=f"2001:db8:ff00::{peer}")


class WireguardGo(Variant):
    name, label = "wireguard-go", "wireguard-go (userspace) + wg"
    # wireguard-go's UAPI sockets live in the shared /var/run/wireguard: names carry the
    # lab instance's tag (Bench.wg_name), so two bench labs at once never collide.
    ifnames = {"gw-a": "a", "gw-b": "b"}

    def unavailable(self, b: Bench) -> str | None:
        return _need("wireguard-go", "wg")

    def setup(self, b: Bench) -> None:
        keys = {gw: b.wg_keypair(gw) for gw in self.ifnames}
        for gw, other, me, endpoint, site in (
            ("gw-a", "gw-b", 1, WAN_B[0], SITE_B), ("gw-b", "gw-a", 2, WAN_A[0], SITE_A)
        ):
            ifname = b.wg_name(self.ifnames[gw])
            b.start_wireguard_go(gw, ifname)
            peer_net = f"198.19.1.{3 - me}/32"
            b.run(gw, ["wg", "set", ifname, "private-key", str(keys[gw][0]),
                       "listen-port", str(WG_PORT), "peer", keys[other][1],
                       "endpoint", f"{endpoint}:{WG_PORT}",
                       "allowed-ips", ",".join((peer_net, *site))])
            b.addr(gw, ifname, f"198.19.1.{me}/30")
            b.route(gw, site[0], oif=ifname)
            b.route(gw, site[1], oif=ifname)


class OpenVpn(Variant):
    """OpenVPN 2.6 point-to-point, userspace data channel (--disable-dco), TUN in each gateway."""

    label = "OpenVPN"
    ifnames = {"gw-a": "gbb-ovpn-a", "gw-b": "gbb-ovpn-b"}
    subnet = 2

    def unavailable(self, b: Bench) -> str | None:
        return _need("openvpn", "openssl")

    def crypto_args(self, b: Bench, gw: str) -> list[str]:
        raise NotImplementedError

    def setup(self, b: Bench) -> None:
        net = f"198.19.{self.subnet}"
        for gw, local, remote, me, peer in (
            ("gw-b", WAN_B[0], WAN_A[0], 2, 1),
            ("gw-a", WAN_A[0], WAN_B[0], 1, 2),
        ):
            ifname = self.ifnames[gw]
            argv = ["openvpn", "--dev", ifname, "--dev-type", "tun", "--proto", "udp",
                    "--local", local, "--lport", str(OVPN_PORT), "--remote", remote,
                    "--rport", str(OVPN_PORT), "--ifconfig", f"{net}.{me}", f"{net}.{peer}",
                    "--disable-dco", "--verb", "3", *self.crypto_args(b, gw)]
            b.spawn(gw, argv, f"{self.name}-{gw}")
        for gw, site in (("gw-a", SITE_B), ("gw-b", SITE_A)):
            ifname = self.ifnames[gw]
            b.wait_for(partial(b.has_address, gw, ifname),
                       20, f"{self.name}: {ifname} configured on {gw}")
            b.route(gw, site[0], oif=ifname)
        b.wait_for(lambda: b.pings("gw-a", f"{net}.2"), 30, f"{self.name}: tunnel handshake")


class OpenVpnNone(OpenVpn):
    name, label = "openvpn-none", "OpenVPN 2.6, no cipher"
    subnet = 2

    def crypto_args(self, b: Bench, gw: str) -> list[str]:
        # No --secret and no TLS: OpenVPN 2.6 runs p2p unencrypted and unauthenticated.
        return ["--cipher", "none", "--auth", "none", "--data-ciphers", "none"]


class OpenVpnGcm(OpenVpn):
    name, label = "openvpn-aes256gcm", "OpenVPN 2.6, AES-256-GCM (TLS p2p)"
    subnet = 3
    ifnames = {"gw-a": "gbb-ovpg-a", "gw-b": "gbb-ovpg-b"}

    def crypto_args(self, b: Bench, gw: str) -> list[str]:
        other = "gw-b" if gw == "gw-a" else "gw-a"
        cert, key, _ = b.self_signed(gw)
        _, _, peer_fp = b.self_signed(other)
        role = ["--tls-server", "--dh", "none"] if gw == "gw-b" else ["--tls-client"]
        return [*role, "--cert", str(cert), "--key", str(key), "--peer-fingerprint", peer_fp,
                "--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM"]


# ---------------------------------------------------------------- grebe
# grebe is built in parallel: a missing part (bridge.cli, the I/O loop) or a config the current
# bridge.config rejects makes the variant "unavailable: <reason>", never a failed run. The
# configs follow bridge/config.py (EXAMPLE there): one [tun], [listen] on the gateway's WAN
# address, one [[peers]] per remote site, GRE-in-UDP port 4754 (RFC 8086 §3.3).

REQUIRED_MODULES = ("bridge.cli", "bridge.io.loop", "bridge.io.tun", "bridge.io.udp",
                    "bridge.pipeline", "bridge.encap")

# gateway: (tun name, tun address, listen address, peer endpoint, peer prefixes)
ENDPOINTS = {
    "gw-a": ("gbb-gr-a", "198.19.5.1/30", "198.18.0.1", "198.18.0.2:4754",
             ("198.18.2.0/24", "2001:db8:2::/64")),
    "gw-b": ("gbb-gr-b", "198.19.5.2/30", "198.18.0.2", "198.18.0.1:4754",
             ("198.18.1.0/24", "2001:db8:1::/64")),
}


def grebe_command() -> list[str] | None:
    """argv prefix that runs the `grebe` console script of this venv, or None."""
    beside = Path(sys.executable).parent / "grebe"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("grebe")
    return [found] if found else None


def config_text(gw: str, mode: str) -> str:
    """The TOML endpoint config of one gateway, encapsulation `mode` ("gre" or "ipip")."""
    tun, tun_addr, listen, endpoint, prefixes = ENDPOINTS[gw]
    peer = "site-b" if gw == "gw-a" else "site-a"
    plist = ", ".join(f'"{p}"' for p in prefixes)
    return (
        "mss_clamp = true\n\n"
        f'[tun]\nname = "{tun}"\naddresses = ["{tun_addr}"]\nmtu = "auto"\n\n'
        f'[listen]\naddress = "{listen}"\nport = 4754\n\n'
        f'[[peers]]\nname = "{peer}"\nendpoint = "{endpoint}"\nprefixes = [{plist}]\n'
        f'encapsulation = "{mode}"\n'
    )


def grebe_unavailable(mode: str = "gre") -> str | None:
    """Why grebe cannot be benchmarked yet, or None when it can."""
    for mod in REQUIRED_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"grebe not runnable yet: {mod} missing ({e})"
        except Exception as e:  # a half-written module must not stop the bench
            return f"grebe not runnable yet: importing {mod} fails: {e!r}"
    cli = importlib.import_module("bridge.cli")
    if not callable(getattr(cli, "main", None)):
        return "grebe not runnable yet: bridge.cli has no main()"
    if grebe_command() is None:
        return "no `grebe` console script in this venv (pip install -e .)"
    try:
        config = importlib.import_module("bridge.config")
        for gw in ENDPOINTS:
            config.loads_config(config_text(gw, mode), file=f"bench-{gw}.toml")
    except Exception as e:
        return f"bench config rejected by bridge.config: {e}"
    return None


def write_grebe_configs(directory: Path, mode: str) -> dict[str, tuple[Path, str]]:
    """Write both gateways' configs; returns {gateway: (config path, tun name)}."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    for gw in ENDPOINTS:
        path = directory / f"{gw}.toml"
        path.write_text(config_text(gw, mode))
        out[gw] = (path, ENDPOINTS[gw][0])
    return out


class Grebe(Variant):
    """`grebe up -c CONFIG` on each gateway, configs generated into the run's temp dir."""

    mode = "gre"

    def unavailable(self, b: Bench) -> str | None:
        return grebe_unavailable(self.mode)

    def setup(self, b: Bench) -> None:
        configs = write_grebe_configs(b.tmp / self.name, self.mode)
        grebe = grebe_command() or ["grebe"]
        for gw, (path, tun) in configs.items():
            b.spawn(gw, [*grebe, "up", "-c", str(path)], f"{self.name}-{gw}")
            b.wait_for(partial(b.link_up, gw, tun), 20, f"grebe TUN {tun} on {gw}")
        for gw, site in (("gw-a", SITE_B), ("gw-b", SITE_A)):
            tun = configs[gw][1]
            if not b.has_route(gw, site[0]):
                b.route(gw, site[0], oif=tun)
        b.wait_for(lambda: b.pings("client", SERVER_V4), 20, f"{self.name}: site A -> site B")


class GrebeGre(Grebe):
    name, label, mode = "grebe-gre", "grebe, GRE-in-UDP (RFC 8086)", "gre"


class GrebeIpip(Grebe):
    name, label, mode = "grebe-ipip", "grebe, IPIP-in-UDP", "ipip"


# ---------------------------------------------------------------- inspection table


class Direct(Variant):
    name, label, table = "direct", "direct (kernel routing, no proxy)", "inspect"

    def setup(self, b: Bench) -> None:
        plain_routes(b)


class MitmproxyWg(Variant):
    """mitmproxy `--mode wireguard` on gw-a; the client joins it with wireguard-go."""

    name, label, table = "mitmproxy-wg", "mitmproxy --mode wireguard (gw-a)", "inspect"
    client_if = "c"  # see WireguardGo.ifnames

    def unavailable(self, b: Bench) -> str | None:
        missing = _need("wireguard-go", "wg")
        if missing:
            return missing
        return b.ensure_mitmproxy()

    def setup(self, b: Bench) -> None:
        plain_routes(b)  # mitmproxy on gw-a reaches the server over plain routing
        server_priv, server_pub = b.wg_keypair("gw-a", "mitm-server")
        client_priv, client_pub = b.wg_keypair("client", "mitm-client")
        keys = b.tmp / "mitm-wireguard.conf"
        keys.write_text(json.dumps({"server_key": server_priv.read_text().strip(),
                                    "client_key": client_priv.read_text().strip()}))
        keys.chmod(0o600)
        b.spawn("gw-a", [str(b.mitmdump), "-q", "--mode", f"wireguard:{keys}@{WG_PORT}",
                         "--set", f"confdir={b.tmp / 'mitm-confdir'}",
                         "--set", "stream_large_bodies=1m"], "mitmdump")
        b.wait_for(lambda: b.udp_listening("gw-a", WG_PORT), 60, "mitmdump WireGuard port")
        wg = b.wg_name(self.client_if)
        b.start_wireguard_go("client", wg)
        b.run("client", ["wg", "set", wg, "private-key", str(client_priv),
                         "peer", server_pub, "endpoint", f"198.18.1.1:{WG_PORT}",
                         "allowed-ips", SITE_B[0]])
        b.addr("client", wg, "198.19.4.1/32")
        b.route("client", SITE_B[0], oif=wg)


class NotBuiltYet(Variant):
    """Hook for grebe's own inspection paths (issue 4): shown as unavailable until built."""

    table = "inspect"

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label

    def unavailable(self, b: Bench) -> str | None:
        return "not built yet: grebe inspection (bridge/inspect, bridge/tproxy) is issue 4"


TUNNEL_VARIANTS: list[Variant] = [
    Plain(), Vxlan(), WireguardGo(), OpenVpnNone(), OpenVpnGcm(), GrebeGre(), GrebeIpip(),
]
INSPECT_VARIANTS: list[Variant] = [
    Direct(), MitmproxyWg(),
    NotBuiltYet("inspect-userspace", "grebe, flow terminated in stack/ (userspace TCP)"),
    NotBuiltYet("inspect-kernel", "grebe, TPROXY to a kernel-TCP relay"),
]
ALL_VARIANTS = {v.name: v for v in (*TUNNEL_VARIANTS, *INSPECT_VARIANTS)}
