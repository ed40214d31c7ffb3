"""virtio-net on a TAP device: the TAP set-up, the device's queues on the host side, and a guest's ARP.

Every test that creates a TAP device runs in a private network namespace: the test forks, the
child calls unshare(CLONE_NEWNET) and runs the test's body there (bringing up lo and the TAP
pykvmtap0 with 10.0.2.2/24), and the parent reports the child's failure with its traceback. So no
test here changes the host's network. Traffic stays inside the namespace: the host side of the
TAP is a packet socket on pykvmtap0, or the namespace's own kernel answering ARP for 10.0.2.2.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from cffi import FFI

from pykvm._ffi import ffi

TAP = "pykvmtap0"
HOST_IP = "10.0.2.2"
GUEST_IP = "10.0.2.15"
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
CLONE_NEWNET = 0x40000000

_libc = FFI()
_libc.cdef("int unshare(int flags);")
_C = _libc.dlopen(None)


# ---- a private network namespace per test -------------------------------------------------------------


def _netns_reason() -> str | None:
    """Why this host cannot give a test a TAP in a private network namespace, or None."""
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this host (the tun module is not loaded: modprobe tun)"
    if shutil.which("ip") is None:
        return "no ip(8) to configure the TAP (apt-get install iproute2)"
    proc = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot make a private network namespace here (unshare --net: {proc.stderr.strip()})"
    return None


NETNS_REASON = _netns_reason()
needs_netns = pytest.mark.skipif(NETNS_REASON is not None, reason=str(NETNS_REASON))


def in_netns(body, *args, timeout: float = 60.0):
    """Run ``body(*args)`` in a forked child inside a new network namespace; re-raise its failure here.

    Returns what the body returned (it must be repr-able as a literal: numbers, strings, tuples...).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(rfd)
            if _C.unshare(CLONE_NEWNET) != 0:
                raise OSError(_libc.errno, f"unshare(CLONE_NEWNET): {os.strerror(_libc.errno)}")
            result = body(*args)
            os.write(wfd, ("ok " + repr(result)).encode())
            status = 0
        except BaseException:
            try:
                os.write(wfd, ("error " + traceback.format_exc()).encode())
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(wfd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([rfd], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the test's network-namespace child ran past {timeout:g} s (killed)")
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, wait_status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith("ok "):
        import ast

        return ast.literal_eval(text[3:])
    if text.startswith("error "):
        pytest.fail("in the network-namespace child:\n" + text[6:], pytrace=False)
    pytest.fail(f"the network-namespace child died ({wait_status:#x}) without a report")


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def bring_up(name: str = TAP, address: str | None = f"{HOST_IP}/24") -> None:
    """lo up; the TAP without IPv6 (no router solicitations on it), with ``address``, up."""
    ip("link", "set", "lo", "up")
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
    if address:
        ip("addr", "add", address, "dev", name)
    ip("link", "set", name, "up")


def packet_socket(name: str = TAP) -> socket.socket:
    """A raw packet socket on ``name``: what it sends goes out to the TAP's reader, what the TAP's
    writer sends arrives here."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.settimeout(5)
    return s


def frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload.ljust(46, b"\0")


def receive(s: socket.socket, match, timeout: float = 5.0) -> bytes:
    """The first frame on ``s`` for which ``match(frame)`` holds (others, e.g. the kernel's own, skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data, addr = s.recvfrom(65536)
        except socket.timeout:
            raise AssertionError(f"no matching frame within {timeout:g} s") from None
        if match(data):
            return data


HOST_MAC_PEER = bytes.fromhex("02aabbccdd01")  # a made-up station on the far side of the TAP
MARK = b"pykvm virtio-net test frame"


# ---- the declarations: cdefs/net.h and the TUN request numbers, against the installed headers -----------


CC = shutil.which("cc")


@pytest.mark.skipif(CC is None, reason="no C compiler (cc) on PATH (apt-get install build-essential)")
def test_net_cdefs_and_tun_requests_match_the_headers(tmp_path):
    from pykvm.virtio.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, REQUESTS, VNET_HDR_SIZE

    ours = {
        "sizeof(struct ifreq)": ffi.sizeof("struct ifreq"),
        "offsetof(struct ifreq, ifr_ifru)": ffi.offsetof("struct ifreq", "ifr_ifru"),
        "offsetof(struct ifreq, ifr_flags)": ffi.offsetof("struct ifreq", "ifr_ifru", "ifru_flags"),
        "sizeof(struct ifmap)": ffi.sizeof("struct ifmap"),
        "sizeof(struct virtio_net_hdr_v1)": ffi.sizeof("struct virtio_net_hdr_v1"),
        "IFF_TAP": IFF_TAP, "IFF_NO_PI": IFF_NO_PI, "IFF_VNET_HDR": IFF_VNET_HDR, "IFNAMSIZ": 16,
    }
    for field in ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset", "num_buffers"):
        ours[f"offsetof(struct virtio_net_hdr_v1, {field})"] = ffi.offsetof("struct virtio_net_hdr_v1", field)
    ours.update(REQUESTS)
    assert ours["sizeof(struct virtio_net_hdr_v1)"] == VNET_HDR_SIZE
    src = tmp_path / "net_layout.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <sys/ioctl.h>\n#include <linux/if.h>\n#include <linux/if_tun.h>\n"
                   "#include <linux/virtio_net.h>\nint main(void)\n{\n"
                   + "".join(f'printf("%s %lld\\n", "{e}", (long long)({e}));\n' for e in ours)
                   + "return 0;\n}\n")
    exe = tmp_path / "net_layout"
    proc = subprocess.run([CC, "-o", str(exe), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"cc failed:\n{proc.stderr}"
    header = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                 check=True).stdout.splitlines())
    wrong = [f"{e}: pykvm {v:#x}, header {int(header[e]):#x}" for e, v in ours.items() if int(header[e]) != v]
    assert not wrong, "cdefs/net.h or pykvm/virtio/tap.py differs from the headers:\n  " + "\n  ".join(wrong)


# ---- tap.py: errors ----------------------------------------------------------------------------------------


def test_tap_name_too_long_is_refused_before_any_call():
    from pykvm.virtio import VirtioError
    from pykvm.virtio.tap import Tap, TapError

    with pytest.raises(TapError, match=r"^TAP device name 'pykvmtap-much-too-long' is too long: 22 bytes, at most 15$") as e:
        Tap("pykvmtap-much-too-long")
    assert isinstance(e.value, VirtioError) and isinstance(e.value, ValueError) and e.value.errno is None
    for bad in ("", "a/b", "a b", "tap:0"):
        with pytest.raises(TapError, match="TAP device"):
            Tap(bad)


def test_tap_without_dev_net_tun_says_so(tmp_path):
    from pykvm.virtio.tap import Tap, TapError

    missing = tmp_path / "tun"
    with pytest.raises(TapError, match=rf"^creating TAP device {TAP} needs {missing}, which does not exist: "
                                       r"load the tun module \(modprobe tun\)$") as e:
        Tap(TAP, tun_path=str(missing))
    assert e.value.errno == errno.ENOENT


def _create_tap():
    from pykvm.virtio.tap import Tap

    with Tap(TAP):
        pass


@needs_netns
def test_tap_without_cap_net_admin_says_how_to_fix_it():
    """The TAP is created in a child without CAP_NET_ADMIN (setpriv drops it from the bounding set;
    as root, execve then leaves it out of the effective set), in its own network namespace."""
    code = ("from pykvm.virtio.tap import Tap, TapError\n"
            "try:\n    Tap('pykvmtap0')\nexcept TapError as e:\n    print(e.errno, e)\nelse:\n    print('created')\n")
    if shutil.which("setpriv") is not None:
        cmd = ["unshare", "--net", "setpriv", "--inh-caps=-all", "--bounding-set=-net_admin",
               sys.executable, "-c", code]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        out = proc.stdout.strip() or proc.stderr.strip()
    else:  # an unprivileged user in a forked child (no CAP_NET_ADMIN at all)
        out = in_netns(_unprivileged_tap_error)
    assert out == (f"{errno.EPERM} creating TAP device pykvmtap0 needs CAP_NET_ADMIN: "
                   "run as root or give pykvm the capability"), out


def _unprivileged_tap_error() -> str:
    from pykvm.virtio.tap import Tap, TapError

    os.setgid(65534)
    os.setuid(65534)
    try:
        Tap(TAP)
    except TapError as e:
        return f"{e.errno} {e}"
    return "created"


# ---- tap.py: frames both ways, no device yet ---------------------------------------------------------------


def _tap_frames_both_ways():
    from pykvm.virtio.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, VNET_HDR_SIZE, Tap

    with Tap(TAP) as tap:
        assert tap.name == TAP
        assert tap.vnet_hdr_size() == VNET_HDR_SIZE
        assert tap.flags() & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        bring_up(address=None)
        buf = bytearray(2048)
        assert tap.read_into([buf]) == 0  # nothing waiting: non-blocking
        with packet_socket() as s:
            # network side -> TAP reader: a 12-byte header of zeros (no offloads), then the frame
            out = frame(b"\xff" * 6, HOST_MAC_PEER, 0x88B5, MARK + b" in")
            s.send(out)
            deadline = time.monotonic() + 5
            while (n := tap.read_into([memoryview(buf)[:VNET_HDR_SIZE], memoryview(buf)[VNET_HDR_SIZE:]])) == 0:
                assert time.monotonic() < deadline, "the frame sent on the packet socket never reached the TAP"
                time.sleep(0.01)
            assert bytes(buf[:10]) == bytes(10), bytes(buf[:VNET_HDR_SIZE]).hex()
            assert bytes(buf[VNET_HDR_SIZE:n]) == out
            # TAP writer -> network side, gathered from two buffers as a virtqueue chain would be
            back = frame(b"\xff" * 6, HOST_MAC_PEER, 0x88B5, MARK + b" out")
            assert tap.write_from([bytes(VNET_HDR_SIZE), back]) == VNET_HDR_SIZE + len(back)
            assert receive(s, lambda f: MARK + b" out" in f) == back
    return "ok"


@needs_netns
def test_tap_carries_frames_both_ways_with_the_virtio_net_header():
    assert in_netns(_tap_frames_both_ways) == "ok"


# ---- VirtioNet on the host side: a Python driver (tests/virtio_driver.py) on bare memory, no guest ----------


GUEST_MAC = "52:54:00:12:34:56"
RX_BUF = 12 + 1514


def _device_moves_frames_both_ways():
    import virtio_driver as drv

    from pykvm.virtio import F_VERSION_1, VirtioMmio
    from pykvm.virtio import mmio as regs
    from pykvm.virtio.net import (F_MAC, F_STATUS, RX_BYTES, RX_DROPPED, RX_FRAMES, RX_TRUNCATED, TX_BYTES,
                                  TX_ERRORS, TX_FRAMES, VirtioNet)

    memory = drv.bare_memory()
    net = VirtioNet(TAP, mac=GUEST_MAC)
    t = VirtioMmio(net, memory, drv.GPA)
    try:
        bring_up(address=None)
        assert t.read(regs.DEVICE_ID, 4) == 1
        features = F_VERSION_1 | F_MAC | F_STATUS
        offered = t.read(regs.DEVICE_FEATURES, 4) | _read_features_high(t, drv) << 32
        assert offered & features == features, hex(offered)
        rx, txq = drv.start(t, memory, features=features)
        config = bytes(drv.reg_read(t, regs.CONFIG + i, 1) for i in range(8))
        assert config == bytes.fromhex(GUEST_MAC.replace(":", "")) + b"\x01\x00"  # mac, VIRTIO_NET_S_LINK_UP
        guest_mac = config[:6]
        buffers = [0x80000 + k * 0x1000 for k in range(3)]
        for k, addr in enumerate(buffers[:2]):
            memory.write(addr, b"\xee" * RX_BUF)
            rx.offer(rx.chain([(addr, RX_BUF, True)], first=k))
        drv.notify(t, 0)
        with packet_socket() as s:
            # the network side sends two frames to the guest's MAC: each lands in a posted buffer
            sent = [frame(guest_mac, HOST_MAC_PEER, 0x88B5, MARK + b" rx %d" % k) for k in range(2)]
            used = []
            for k, f in enumerate(sent):
                s.send(f)
                _wait_for(lambda: rx.used_idx == k + 1, f"frame {k} did not land in a receive buffer", net)
                assert drv.wait_interrupt(t) >= 1  # the driver did not set VIRTQ_AVAIL_F_NO_INTERRUPT
                used += rx.take_used()
            assert [head for head, _ in used] == [0, 1]
            for (head, length), f, addr in zip(used, sent, buffers):
                assert length == 12 + len(f)
                data = memory.read(addr, length)
                assert data[:12] == bytes(10) + b"\x01\x00", data[:12].hex()  # num_buffers = 1
                assert data[12:] == f
                assert memory.read(addr + length, 1) == b"\xee"  # nothing written past the frame
            assert net.stats[RX_FRAMES] == 2 and net.stats[RX_BYTES] == sum(map(len, sent))

            # no buffer posted: the next frame is dropped and counted
            s.send(frame(guest_mac, HOST_MAC_PEER, 0x88B5, MARK + b" dropped"))
            _wait_for(lambda: net.stats[RX_DROPPED] >= 1, "the frame sent with no buffer posted was not dropped",
                      net)
            assert rx.take_used() == []

            # a buffer shorter than the frame: the frame is cut to it
            memory.write(buffers[2], b"\xee" * 64)
            rx.offer(rx.chain([(buffers[2], 12 + 20, True)], first=2))
            drv.notify(t, 0)
            s.send(frame(guest_mac, HOST_MAC_PEER, 0x88B5, MARK + b" cut"))
            _wait_for(lambda: rx.used_idx == 3, "the short buffer was not used", net)
            assert rx.take_used() == [(2, 32)] and net.stats[RX_TRUNCATED] == 1
            assert memory.read(buffers[2] + 32, 1) == b"\xee"

            # transmit: header and frame in two readable descriptors reach the network side as one frame
            out = frame(b"\xff" * 6, guest_mac, 0x88B5, MARK + b" tx")
            memory.write(0x90000, bytes(12))
            memory.write(0x91000, out)
            txq.offer(txq.chain([(0x90000, 12, False), (0x91000, len(out), False)]))
            drv.notify(t, 1)
            assert receive(s, lambda f: MARK + b" tx" in f) == out
            _wait_for(lambda: txq.used_idx == 1, "the transmit chain was not returned", net)
            assert txq.take_used() == [(0, 0)]
            assert net.stats[TX_FRAMES] == 1 and net.stats[TX_BYTES] == len(out)

            # a transmit chain shorter than the header is an error, counted; the chain still comes back
            txq.offer(txq.chain([(0x90000, 6, False)], first=2))
            drv.notify(t, 1)
            _wait_for(lambda: txq.used_idx == 2, "the short transmit chain was not returned", net)
            assert txq.take_used() == [(2, 0)] and net.stats[TX_ERRORS] == 1 and net.stats[TX_FRAMES] == 1
            assert t.stats["notifies (trapped)"] == 4 and not t.error, (dict(t.stats), t.error)
    finally:
        t.close()
        drv.close_memory(memory)
    assert net.tap.fd == -1  # closing the transport closed the TAP
    return "ok"


def _read_features_high(t, drv) -> int:
    from pykvm.virtio import mmio as regs

    drv.reg_write(t, regs.DEVICE_FEATURES_SEL, 1)
    value = drv.reg_read(t, regs.DEVICE_FEATURES)
    drv.reg_write(t, regs.DEVICE_FEATURES_SEL, 0)
    return value


def _wait_for(condition, message: str, net, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message} (stats {dict(net.stats)})"
        time.sleep(0.01)


@needs_netns
def test_device_moves_frames_between_the_queues_and_the_tap():
    """A frame from the network side lands in a posted receive buffer (header, num_buffers = 1), one
    without a buffer is dropped and counted, one too long is cut; a transmit chain reaches the wire."""
    assert in_netns(_device_moves_frames_both_ways) == "ok"


def test_bad_mac_addresses_are_refused():
    from pykvm.virtio import VirtioError
    from pykvm.virtio.net import VirtioNet

    for mac, message in (("52:54:00:12:34", "not six hex bytes"), ("01:00:5e:00:00:01", "multicast"),
                         ("00:00:00:00:00:00", "not a station address"), (b"\x52\x54", "6 bytes")):
        with pytest.raises(VirtioError, match=message):
            VirtioNet(TAP, mac=mac)  # refused before any TAP is made


# ---- a guest: the virtio test kernel's driver ARPs for the host across the TAP --------------------------------

MEM = 32 << 20


def _guest_arps_for_the_host():
    from pykvm.images import built
    from pykvm.machine import Machine
    from pykvm.virtio.net import RX_FRAMES, TX_FRAMES, VirtioNet

    path = built("virtio_driver.elf", what="the virtio test kernel")
    with Machine(MEM, irqchip=True) as m:
        t = m.add_virtio(VirtioNet(TAP, mac=GUEST_MAC))
        bring_up()  # 10.0.2.2/24 on the TAP: this namespace's kernel answers ARP for it
        m.load_kernel(path.read_bytes(), path=str(path), cmdline=f"{t.cmdline_arg} net={HOST_IP}/{GUEST_IP}")
        outcome = m.run(timeout=120)
        neigh = subprocess.run(["ip", "neigh", "show", GUEST_IP, "dev", TAP], capture_output=True, text=True).stdout
        # (not /sys/class/net: sysfs stays the one of the namespace that mounted it)
        tap_mac = subprocess.run(["ip", "-br", "link", "show", "dev", TAP], capture_output=True,
                                 text=True).stdout.split()[2]
        return (outcome.status, m.console_output.decode("utf-8", "replace"), dict(t.stats), t.error,
                dict(t.device.stats), neigh.strip(), tap_mac)


@needs_netns
@pytest.mark.kvm
def test_guest_driver_gets_an_arp_reply_from_the_host_through_the_tap():
    status, console, stats, error, net_stats, neigh, tap_mac = in_netns(_guest_arps_for_the_host, timeout=180)
    assert status == 0 and "FAIL" not in console, console
    assert f"net: mac {GUEST_MAC}, link up" in console, console
    replies = [line for line in console.splitlines() if line.startswith("net: arp reply from ")]
    assert replies and replies[0].split()[4] == tap_mac, (tap_mac, console)  # answered by the host's end
    # the host kernel learnt the guest's address from the request it answered
    assert GUEST_MAC in neigh, neigh
    assert net_stats["tx frames"] >= 1 and net_stats["rx frames"] >= 1, net_stats
    assert stats["notifies (ioeventfd)"] >= 1 and stats.get("notifies (trapped)", 0) == 0, stats
    assert stats["interrupts (irqfd)"] >= 1 and error is None, (stats, error)
