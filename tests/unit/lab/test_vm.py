"""linux-vm nodes without a guest: image pieces (bridge/lab/vmimage.py) and the scripts,
command lines and agent protocol of bridge/lab/vm.py. No root, no qemu, no namespaces."""

from __future__ import annotations

import base64
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from bridge.lab import vm, vmimage
from bridge.lab.topology import load
from bridge.lab.topomodel import NodeKind


def test_two_sites_linux_makes_gw_b_a_linux_vm_with_shell_run_lines() -> None:
    topo = load("two-sites-linux")
    gw_b = topo.node("gw-b")
    assert gw_b.kind is NodeKind.LINUX_VM
    assert gw_b.interfaces == ("wan0", "lan0")
    lines = [c.line for c in gw_b.run]
    assert "ip fou add port 4754 ipproto 47" in lines
    assert any("type gre" in line and "encap fou" in line and "key 42" in line
               for line in lines)
    assert topo.node("gw-a").kind is NodeKind.HOST


def test_netconfig_script_renames_by_mac_then_configures() -> None:
    topo = load("two-sites-linux")
    node = topo.node("gw-b")
    macs = {"wan0": "52:54:00:00:00:01", "lan0": "52:54:00:00:00:02"}
    script = vm.netconfig_script(topo, node, macs)
    lines = script.splitlines()
    assert lines[0] == "set -e"
    assert '"52:54:00:00:00:01" ] && ip link set dev "${d##*/}" name gbtmp0' in script
    assert lines.index("ip link set dev gbtmp0 name wan0") < lines.index(
        "ip link set dev wan0 up")
    assert "echo 1 > /proc/sys/net/ipv4/ip_forward" in lines
    assert "ip addr add 198.18.0.2/24 dev wan0" in lines
    assert "ip addr add 2001:db8:2::1/64 dev lan0 nodad" in lines  # no DAD wait, RFC 4862
    # sysctls and addresses come before routes (a route needs its address's subnet)
    assert lines.index("ip addr add 198.18.2.1/24 dev lan0") > lines.index(
        "echo 1 > /proc/sys/net/ipv4/ip_forward")


def test_mac_is_stable_unicast_and_local() -> None:
    a = vm.mac("lab", "gw-b", 0)
    assert a == vm.mac("lab", "gw-b", 0)
    assert len({a, vm.mac("lab", "gw-b", 1), vm.mac("x", "gw-b", 0)}) == 3
    first = int(a.split(":")[0], 16)
    assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered


def test_qemu_argv_is_tcg_with_one_nic_per_tap_and_the_agent_port(tmp_path: Path) -> None:
    image = vmimage.Image(tmp_path / "k", tmp_path / "i", "6.1.0-x", "linux.deb")
    argv = vm.qemu_argv(image, [("tap0", "52:54:00:00:00:01"), ("tap1", "52:54:00:00:00:02")],
                        tmp_path / "n.agent")
    assert argv[0] == "qemu-system-x86_64" and "-enable-kvm" not in argv
    assert "-nographic" in argv
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "k")
    assert "tap,id=n1,ifname=tap1,script=no,downscript=no" in argv
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01" in argv
    assert f"socket,id=agent,path={tmp_path / 'n.agent'},server=on,wait=off" in argv


def test_load_order_puts_dependencies_first_and_finds_cycles() -> None:
    deps = {"fou6": ["ip6_tunnel", "fou"], "fou": ["udp_tunnel"], "ip6_tunnel": ["tunnel6"]}
    order = vmimage.load_order(("fou6",), deps)
    assert order == ["tunnel6", "ip6_tunnel", "udp_tunnel", "fou", "fou6"]
    with pytest.raises(vmimage.ImageError, match="cycle"):
        vmimage.load_order(("a",), {"a": ["b"], "b": ["a"]})


def test_module_depends_reads_the_modinfo_string() -> None:
    ko = b"\x7fELF...\x00license=GPL\x00depends=ip_tunnel,udp_tunnel\x00name=fou\x00"
    assert vmimage.module_depends(ko) == ["ip_tunnel", "udp_tunnel"]
    assert vmimage.module_depends(b"\x00depends=\x00") == []
    assert vmimage.module_depends(b"no modinfo") == []


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a cpio newc archive (Linux buffer-format.rst), for checking."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_newc_archive_has_parents_modes_links_and_padding() -> None:
    c = vmimage.Cpio()
    c.file("etc/grebe/agent", b"echo hi\n")
    c.symlink("bin/sh", "busybox")
    c.file("init", b"#!/bin/sh\n", 0o755)
    data = c.finish()
    assert len(data) % 512 == 0
    entries = read_newc(data)
    assert list(entries)[:2] == ["etc", "etc/grebe"]  # parents before children
    assert entries["etc/grebe/agent"] == (0o100644, b"echo hi\n")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["init"] == (0o100755, b"#!/bin/sh\n")


def fake_agent(sock: socket.socket, replies: dict[str, tuple[int, bytes, bytes]],
               junk: bool = True) -> None:
    """A guest agent in a thread: answers SYNC (after ignoring the first, as a guest that
    has not opened its port yet) and RUN with canned results keyed by script."""
    conn, _ = sock.accept()
    f = conn.makefile("rwb")
    synced = 0
    for raw in f:
        verb, tag, *rest = raw.decode().split()
        if verb == "SYNC":
            synced += 1
            if synced >= 2:
                if junk:  # a previous client's leftovers, to be ignored
                    f.write(b"RC deadbeef 3\nOUT deadbeef\nZm9v\n")
                f.write(f"SYNCED {tag}\n".encode())
                f.flush()
        elif verb == "RUN":
            script = base64.b64decode(rest[1]).decode()
            stdin = b"" if rest[2] == "-" else base64.b64decode(rest[2])
            rc, out, err = replies[script]
            out += stdin
            f.write(f"OUT {tag}\n".encode() + base64.encodebytes(out) + f"ERR {tag}\n".encode()
                    + base64.encodebytes(err) + f"RC {tag} {rc}\n".encode())
            f.flush()
            break
    conn.close()


@pytest.mark.parametrize("rc", [0, 3])
def test_agent_client_syncs_skips_stale_lines_and_decodes(tmp_path: Path, rc: int) -> None:
    path = tmp_path / "g.agent"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    t = threading.Thread(target=fake_agent, args=(server, {"echo x": (rc, b"x\n" * 100,
                                                                       b"warn\n")}))
    t.start()
    res = vm.Agent(path, "g").run("echo x", timeout=5, input=b"IN")
    t.join(5)
    server.close()
    assert res == vm.Result(rc, b"x\n" * 100 + b"IN", b"warn\n")


def test_agent_turns_a_guest_side_kill_into_timeout_expired(tmp_path: Path) -> None:
    path = tmp_path / "g.agent"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    t = threading.Thread(target=fake_agent, args=(server, {"sleep 9": (137, b"", b"")}, False))
    t.start()
    with pytest.raises(subprocess.TimeoutExpired):
        vm.Agent(path, "g").run("sleep 9", timeout=1)
    t.join(5)
    server.close()


def test_agent_without_a_guest_is_a_guest_error(tmp_path: Path) -> None:
    with pytest.raises(vm.GuestError, match="agent socket"):
        vm.Agent(tmp_path / "none.agent", "g").run("true", connect_timeout=0.2)


def test_agent_gives_up_at_once_when_qemu_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "g.agent"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)  # accepts (the kernel does) but never answers, like a guest not booted
    try:
        with pytest.raises(vm.GuestError, match="qemu exited"):
            vm.Agent(path, "g").run("true", connect_timeout=60, alive=lambda: False)
    finally:
        server.close()
