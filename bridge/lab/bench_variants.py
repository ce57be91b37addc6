"""The variants `./netns-lab.sh bench` measures: how each one joins site A to site B.

Rules:
- A variant only sets up and tears down the path between the two sites on the gateways
  (and, for the inspection table, a proxy and a client-side tunnel). Measuring is the
  runner's job (`bench.py`), the same for every variant, so rows are comparable.
- Every change goes through `Bench` (`bench_lab.py`): netlink changes with pyroute2 inside the
  lab's namespaces, each registered with its undo; processes through `Bench.spawn`, which
  keeps their logs in the run's temp dir. `teardown()` undoes all of it, so variants run
  one after another in the same lab without leaking routes, devices or processes.
- Addresses: sites are 198.18.1.0/24 and 198.18.2.0/24 (2001:db8:1::/64, 2001:db8:2::/64),
  the WAN 198.18.0.0/24; each overlay gets its own 198.19.N.0/30 (N = variant number).
- A variant that cannot run here says why in `unavailable()` (missing tool, no `grebe`
  console script); the run then shows "unavailable: <reason>" in its row instead of failing.

Adding a variant: subclass `Variant` (table "tunnel": measured with iperf3 and ping
client -> server; table "inspect": measured with curl downloads from the server's HTTP),
implement `setup()` (and `unavailable()` if it needs something optional), and append an
instance to `TUNNEL_VARIANTS` or `INSPECT_VARIANTS`. grebe's two termination backends share
`GrebeInspect`: the same rule on gw-a, `backend = "userspace"` or `"kernel"`.
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config import loads_config
from bridge.lab import impair

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

    def verify(self, b: Bench, flows: int) -> str | None:
        """After measuring (`flows` TCP connections were made): why the traffic did not take
        this variant's path, or None. Default: the topology already guarantees it."""
        return None

    def teardown(self, b: Bench) -> None:
        b.undo_all()


def _need(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"missing tool(s): {', '.join(missing)}" if missing else None


def plain_routes(b: Bench) -> None:
    """Route each remote site via the peer gateway's WAN address (no tunnel)."""
    for gw, remote, peer in (("gw-a", SITE_B, WAN_B), ("gw-b", SITE_A, WAN_A)):
        for dst, via in zip(remote, peer, strict=True):  # IPv4, then IPv6
            b.route(gw, dst, gateway=via)


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


def config_text(gw: str, mode: str, extra: str = "", top: str = "") -> str:
    """The TOML endpoint config of one gateway, encapsulation `mode` ("gre" or "ipip"),
    followed by `extra` TOML (e.g. [[inspect]] rules); `top`: more top-level keys."""
    tun, tun_addr, listen, endpoint, prefixes = ENDPOINTS[gw]
    if "security = " in extra:  # a secure peer: its endpoint's port is the secure port
        endpoint = endpoint.rpartition(":")[0]
    peer = "site-b" if gw == "gw-a" else "site-a"
    plist = ", ".join(f'"{p}"' for p in prefixes)
    return (
        "mss_clamp = true\n" + (f"{top}\n" if top else "") + "\n"
        f'[tun]\nname = "{tun}"\naddresses = ["{tun_addr}"]\nmtu = "auto"\n\n'
        f'[listen]\naddress = "{listen}"\nport = 4754\n\n'
        f'[[peers]]\nname = "{peer}"\nendpoint = "{endpoint}"\nprefixes = [{plist}]\n'
        f'encapsulation = "{mode}"\n' + (f"\n{extra}" if extra else "")
    )


def grebe_unavailable(mode: str = "gre") -> str | None:
    """Why grebe cannot be benchmarked yet, or None when it can."""
    if grebe_command() is None:
        return "no `grebe` console script in this venv (pip install -e .)"
    try:
        for gw in ENDPOINTS:
            loads_config(config_text(gw, mode), file=f"bench-{gw}.toml")
    except Exception as e:
        return f"bench config rejected by bridge.config: {e}"
    return None


def write_grebe_configs(directory: Path, mode: str, extra: dict[str, str] | None = None,
                        top: str = "") -> dict[str, tuple[Path, str]]:
    """Write both gateways' configs; returns {gateway: (config path, tun name)}."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    for gw in ENDPOINTS:
        path = directory / f"{gw}.toml"
        path.write_text(config_text(gw, mode, (extra or {}).get(gw, ""), top))
        out[gw] = (path, ENDPOINTS[gw][0])
    return out


def start_grebe(b: Bench, name: str, mode: str, extra: dict[str, str] | None = None,
                top: str = "") -> dict[str, tuple[Path, str]]:
    """`grebe up` on both gateways until the client reaches the server through it."""
    configs = write_grebe_configs(b.tmp / name, mode, extra, top)
    grebe = grebe_command() or ["grebe"]
    for gw, (path, tun) in configs.items():
        b.spawn(gw, [*grebe, "up", "-c", str(path)], f"{name}-{gw}")
        b.wait_for(partial(b.link_up, gw, tun), 20, f"grebe TUN {tun} on {gw}")
    for gw, site in (("gw-a", SITE_B), ("gw-b", SITE_A)):
        tun = configs[gw][1]
        if not b.has_route(gw, site[0]):  # grebe routes its peers' prefixes itself
            b.route(gw, site[0], oif=tun)
    b.wait_for(lambda: b.pings("client", SERVER_V4), 20, f"{name}: site A -> site B")
    return configs


class Grebe(Variant):
    """`grebe up -c CONFIG` on each gateway, configs generated into the run's temp dir."""

    mode = "gre"
    top = ""  # more top-level config keys

    def unavailable(self, b: Bench) -> str | None:
        return grebe_unavailable(self.mode)

    def setup(self, b: Bench) -> None:
        start_grebe(b, self.name, self.mode, top=self.top)


class GrebeGre(Grebe):
    name, label, mode = "grebe-gre", "grebe, GRE-in-UDP (RFC 8086)", "gre"
    top = 'datapath = "python"'  # issue 14: the Python rows stay Python under datapath auto


class GrebeGreCold(Grebe):
    """grebe-gre without keep-warm (bridge/io/warm.py): what it buys, in the same run."""

    name, label, mode = "grebe-gre-cold", "grebe, GRE-in-UDP, keep_warm = false", "gre"
    top = 'keep_warm = false\ndatapath = "python"'


class GrebeSecure(Grebe):
    """issue 12: GRE-in-UDP with `security = MODE` (docs/SECURE.md), keys made per run."""

    security = ""

    def setup(self, b: Bench) -> None:
        from bridge.secure.keys import write_private_key

        d = b.tmp / self.name
        d.mkdir(parents=True, exist_ok=True)
        pubs = {}
        for gw in ENDPOINTS:
            key = d / f"{gw}.key"
            key.unlink(missing_ok=True)
            pubs[gw] = write_private_key(str(key))
        extra = {gw: f'security = "{self.security}"\nprivate_key_file = "{d / f"{gw}.key"}"\n'
                 f'public_key = "{pubs["gw-b" if gw == "gw-a" else "gw-a"]}"\n'
                 for gw in ENDPOINTS}
        start_grebe(b, self.name, self.mode, extra=extra, top=self.top)


class GrebeAuth(GrebeSecure):
    name, label, mode = "grebe-auth", "grebe, GRE-in-UDP, authenticated (AES-GCM tag)", "gre"
    top, security = 'datapath = "python"', "authenticated"


class GrebeEncrypt(GrebeSecure):
    name, label, mode = "grebe-encrypt", "grebe, GRE-in-UDP, encrypted (AES-256-GCM)", "gre"
    top, security = 'datapath = "python"', "encrypted"


class GrebeEncrypt1p(GrebeSecure):
    """grebe-encrypt with split_directions = false: what the split buys, in the same run."""

    name, label, mode = "grebe-encrypt-1p", "grebe, encrypted, one process", "gre"
    top, security = 'datapath = "python"\nsplit_directions = false', "encrypted"


class GrebeAuth1p(GrebeSecure):
    """grebe-auth with split_directions = false: what the split buys, in the same run."""

    name, label, mode = "grebe-auth-1p", "grebe, authenticated, one process", "gre"
    top, security = 'datapath = "python"\nsplit_directions = false', "authenticated"


class GrebeIpip(Grebe):
    name, label, mode = "grebe-ipip", "grebe, IPIP-in-UDP", "ipip"
    top = 'datapath = "python"'


class GrebeEbpf(Grebe):
    """issue 14: the same configs with the eBPF fast path (bridge/ebpf/) forwarding."""

    top = 'datapath = "ebpf"'

    def unavailable(self, b: Bench) -> str | None:
        reason = grebe_unavailable(self.mode)
        if reason:
            return reason
        try:
            from bridge.ebpf.build import object_path

            object_path()
        except Exception as e:  # no clang/libbpf: say so in the row
            return f"eBPF object not built: {e}"
        return None

    def verify(self, b: Bench, flows: int) -> str | None:
        cp = b.run("gw-a", ["grebe", "status", "--json", "-i", ENDPOINTS["gw-a"][0]],
                   check=False)
        try:
            st = json.loads(cp.stdout)
        except ValueError:
            return f"grebe status on gw-a failed: {cp.stderr.strip()}"
        fast = st.get("ebpf") or {}
        if st.get("datapath") != "ebpf" or not fast.get("encap") or not fast.get("decap"):
            return f"the eBPF program did not carry the traffic: {fast}"
        return None


class GrebeGreEbpf(GrebeEbpf):
    name, label, mode = "grebe-gre-ebpf", "grebe, GRE-in-UDP, eBPF fast path", "gre"


class GrebeIpipEbpf(GrebeEbpf):
    name, label, mode = "grebe-ipip-ebpf", "grebe, IPIP-in-UDP, eBPF fast path", "ipip"


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
        # Not -q: mitmdump prints one line per flow, which verify() counts.
        b.spawn("gw-a", [str(b.mitmdump), "--mode", f"wireguard:{keys}@{WG_PORT}",
                         "--set", f"confdir={b.tmp / 'mitm-confdir'}",
                         "--set", "stream_large_bodies=1m"], "mitmdump",
                env={"PYTHONUNBUFFERED": "1"})
        b.wait_for(lambda: b.udp_listening("gw-a", WG_PORT), 60, "mitmdump WireGuard port")
        wg = b.wg_name(self.client_if)
        b.start_wireguard_go("client", wg)
        b.run("client", ["wg", "set", wg, "private-key", str(client_priv),
                         "peer", server_pub, "endpoint", f"198.18.1.1:{WG_PORT}",
                         "allowed-ips", SITE_B[0]])
        b.addr("client", wg, "198.19.4.1/32")
        b.route("client", SITE_B[0], oif=wg)

    def verify(self, b: Bench, flows: int) -> str | None:
        log = b.tmp / "mitmdump.log"

        def seen() -> int:
            text = log.read_text(errors="replace") if log.exists() else ""
            return text.count(f"GET http://{SERVER_V4}/")
        try:
            b.wait_for(lambda: seen() >= flows, 5, "mitmdump flow lines")
        except TimeoutError:
            return f"mitmdump showed {seen()} requests of {flows}: traffic bypassed it"
        return None


# The rule an inspection variant adds to gw-a: the server's HTTP, terminated by one of grebe's
# backends and parsed by the `http` inspector, so that it does about what mitmproxy does with
# the same download. The `log` inspector writes one line per flow: the proof that the flows
# took this path.
INSPECT_RULE = """[[inspect]]
name = "bench-http"
backend = "{backend}"
dst = ["198.18.2.10/32"]
dst_ports = [80]
inspectors = ["log", "http"]
log_path = "{log}"
"""


class GrebeInspect(Variant):
    """grebe GRE-in-UDP between the gateways, and gw-a terminating the client's HTTP in one of
    its backends before re-originating it through the tunnel with the client's address."""

    table = "inspect"
    backend = "userspace"

    def rule(self, log: Path) -> str:
        return INSPECT_RULE.format(backend=self.backend, log=log)

    def unavailable(self, b: Bench) -> str | None:
        reason = grebe_unavailable("gre")
        if reason:
            return reason
        try:
            loads_config(config_text("gw-a", "gre", self.rule(b.tmp / "f.jsonl"))).inspect_rules()
        except Exception as e:  # the rule format moved on
            return f"grebe {self.backend} inspection not usable: {type(e).__name__}: {e}"
        return None

    def setup(self, b: Bench) -> None:
        self.flow_log = b.tmp / f"{self.name}-flows.jsonl"
        self.configs = start_grebe(b, self.name, "gre", {"gw-a": self.rule(self.flow_log)})

    def verify(self, b: Bench, flows: int) -> str | None:
        # the log inspector writes a flow's line when it ends; give the last one a moment
        def logged() -> bool:
            return self.flow_log.exists() and len(self.flow_log.read_bytes().splitlines()) >= flows
        try:
            b.wait_for(logged, 5, "flow log lines")
        except TimeoutError:
            n = len(self.flow_log.read_bytes().splitlines()) if self.flow_log.exists() else 0
            return f"{self.backend} inspection logged {n} flows for {flows} requests: bypassed"
        return None


class InspectUserspace(GrebeInspect):
    """The flow is terminated inside grebe by stack/, our own TCP (bridge/userspace/)."""

    name, label = "inspect-userspace", "grebe, flow terminated in stack/ (userspace TCP), http"
    backend = "userspace"


class InspectKernel(GrebeInspect):
    """The kernel terminates the flow (`python -m bridge.kernel`: nftables TPROXY and an
    asyncio relay); the same inspectors run on the byte streams."""

    name, label = "inspect-kernel", "grebe + TPROXY kernel relay, http inspector"
    backend = "kernel"

    def unavailable(self, b: Bench) -> str | None:
        return _need("nft") or super().unavailable(b)

    def setup(self, b: Bench) -> None:
        super().setup(b)
        ready = b.tmp / "tproxy.ready"
        b.spawn("gw-a", [sys.executable, "-m", "bridge.kernel", "-c",
                         str(self.configs["gw-a"][0]), "--iif", "lan0", "--ready-file",
                         str(ready)], "tproxy-gw-a")
        b.wait_for(ready.exists, 20, "bridge.kernel.relay listening on gw-a")


# Issue 11's lossy WAN, on the WAN link of gateway A (bridge/lab/impair.py; each direction).
LOSSY_WAN = {"loss": "2%", "reorder": "3%", "delay": "2ms"}
LOSSY_LINK = "wan-a"


def impair_wan(b: Bench) -> None:
    """Apply LOSSY_WAN to wan-a until the variant's teardown."""
    lab: Any = b.lab
    impair.apply(lab, LOSSY_LINK, impair.parse_impairment(LOSSY_WAN, "bench.lossy"))
    b.on_undo(lambda: impair.clear(lab, LOSSY_LINK))


class InspectLossy(InspectUserspace):
    """inspect-userspace with the lossy WAN: the stack's loss recovery on the server leg."""

    name = "inspect-lossy"
    label = "inspect-userspace, wan-a loss=2% reorder=3% delay=2ms"

    def setup(self, b: Bench) -> None:
        super().setup(b)
        impair_wan(b)


class DirectLossy(Variant):
    """The same grebe tunnel without an inspect rule (kernel TCP end to end), same WAN."""

    name, table = "direct-lossy", "inspect"
    label = "grebe GRE, no inspection, wan-a loss=2% reorder=3% delay=2ms"

    def unavailable(self, b: Bench) -> str | None:
        return grebe_unavailable("gre")

    def setup(self, b: Bench) -> None:
        start_grebe(b, self.name, "gre")
        impair_wan(b)


TUNNEL_VARIANTS: list[Variant] = [
    Plain(), Vxlan(), WireguardGo(), OpenVpnNone(), OpenVpnGcm(), GrebeGre(), GrebeGreCold(),
    GrebeIpip(), GrebeGreEbpf(), GrebeIpipEbpf(), GrebeAuth(), GrebeEncrypt(),
    GrebeAuth1p(), GrebeEncrypt1p(),
]
INSPECT_VARIANTS: list[Variant] = [
    Direct(), MitmproxyWg(), InspectUserspace(), InspectKernel(), DirectLossy(), InspectLossy(),
]
ALL_VARIANTS = {v.name: v for v in (*TUNNEL_VARIANTS, *INSPECT_VARIANTS)}
