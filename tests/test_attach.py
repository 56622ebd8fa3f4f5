"""Attaching: modes, mode changes, foreign programs, detach and cleanup, on a
real veth pair in a network namespace of its own."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from xdplb.dataplane import loader
from xdplb.dataplane.config import Capacities

NS = "xat-ns"
PIN_ROOT = "/sys/fs/bpf/xdplb-test-attach"
CAPS = Capacities(conntrack=1024, table_slots=4096, source_routes=64, groups=64,
                  listener_keys=64, listeners=64, backends=64)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def netns() -> Iterator[None]:
    """Enter a fresh network namespace (the mount namespace stays: pins are visible)."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh(f"ip netns add {NS}")
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    setns(fd)
    os.close(fd)
    sh("ip link add xa0 type veth peer name xa1 && ip link set xa0 up && ip link set xa1 up")
    try:
        yield
    finally:
        setns(own)
        os.close(own)
        sh(f"ip netns del {NS}")


@pytest.fixture(scope="module")
def dp(netns: None) -> Iterator[loader.DataPlane]:
    d = loader.DataPlane(PIN_ROOT, CAPS)
    d.load()
    yield d
    d.close()
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


def tc_egress(dev: str) -> str:
    return sh(f"tc filter show dev {dev} egress")


def test_native_then_generic_then_detach(dp: loader.DataPlane) -> None:
    assert dp.attach("xa0", "native") == "native"
    st = loader.xdp_state("xa0")
    assert st.mode == "native" and st.prog_id
    assert "xdplb_egress" in tc_egress("xa0")
    # Re-attaching in the same mode replaces in place.
    assert dp.attach("xa0", "native") == "native"
    assert tc_egress("xa0").count("name xdplb_egress") == 1
    # A mode change detaches first (an attach over the other mode would fail).
    assert dp.attach("xa0", "generic") == "generic"
    assert loader.xdp_state("xa0").mode == "generic"
    assert loader.attached_interfaces() == ["xa0"]
    assert loader.detach("xa0")
    assert loader.xdp_state("xa0").prog_id == 0
    assert "xdplb" not in tc_egress("xa0")
    assert "clsact" in sh("tc qdisc show dev xa0")  # never deleted: others may share it


def test_offload_is_refused_clearly(dp: loader.DataPlane) -> None:
    with pytest.raises(loader.AttachError, match="cannot be offloaded"):
        dp.attach("xa0", "offload")


def test_foreign_program_needs_force(dp: loader.DataPlane) -> None:
    from bcc import BPF

    other = BPF(text="int other_prog(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = other.load_func("other_prog", BPF.XDP)
    BPF.attach_xdp("xa1", fn, loader.XDP_FLAGS["generic"])
    try:
        with pytest.raises(loader.AttachError, match=r"other_prog.*--force"):
            dp.attach("xa1", "generic")
        assert dp.attach("xa1", "generic", force=True) == "generic"
        assert loader.attached_interfaces() == ["xa1"]
    finally:
        loader.detach("xa1")
        BPF.remove_xdp("xa1", loader.XDP_FLAGS["generic"])
        other.cleanup()


def test_cleanup_removes_programs_filters_and_pins(dp: loader.DataPlane) -> None:
    dp.attach("xa0", "native")
    dp.attach("xa1", "generic")
    assert os.listdir(PIN_ROOT)
    assert sorted(loader.cleanup(PIN_ROOT)) == ["xa0", "xa1"]
    assert loader.attached_interfaces() == []
    assert "xdplb" not in tc_egress("xa0") + tc_egress("xa1")
    assert not os.path.exists(PIN_ROOT)


def test_a_restart_reuses_the_programs_compiled_from_the_same_code() -> None:
    from xdplb.dataplane import bpfsys
    from xdplb.dataplane.config import Timeouts, cflags

    root = f"{PIN_ROOT}-reuse"
    first = loader.DataPlane(root, CAPS)
    first.load()
    try:
        assert not first.reused and first.bpf is None  # compiled in a child process
        again = loader.DataPlane(root, CAPS)
        again.load()
        assert again.reused and again.bpf is None and again.load_seconds < 0.5
        ids = [bpfsys.prog_info(d.tc_fn.fd).id for d in (first, again)]
        assert again.xdp_ids == first.xdp_ids and ids[0] == ids[1]
        assert {m.info.id for m in again.maps.values()} == \
            {m.info.id for m in first.maps.values()}
        again.close()
        # Other flags are other code; a map that is no longer pinned is not the one
        # the programs use: compiled again, both.
        flags = cflags(CAPS, Timeouts())
        assert loader.code_digest(flags) != loader.code_digest(
            cflags(CAPS, Timeouts(udp=31)))
        os.unlink(f"{first.pin_dir}/stats")
        third = loader.DataPlane(root, CAPS)
        third.load()
        assert not third.reused and not set(third.xdp_ids) & set(first.xdp_ids)
        os.mkdir(f"{third.pin_dir}/code-0123456789ab")  # an older agent's code
        third.remove_stale_pins()
        assert [p for p in os.listdir(third.pin_dir) if p.startswith("code-")] == \
            [os.path.basename(third.code_dir)]
        third.close()
    finally:
        first.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_compilers_error_reaches_the_agent() -> None:
    from xdplb.dataplane.apart import run_apart

    assert run_apart("xdplb.sni.splice:compile_splice", f"{PIN_ROOT}-none", "many") == \
        "invalid literal for int() with base 10: 'many'"


def test_load_async_hands_its_error_to_the_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: loader.DataPlane) -> None:
        raise loader.AttachError("pinned map has another shape")

    monkeypatch.setattr(loader.DataPlane, "load", fail)
    dp = loader.DataPlane(PIN_ROOT, CAPS)
    dp.load_async()
    with pytest.raises(loader.AttachError, match="another shape"):
        dp.wait_loaded()


def test_node_changes_reports_link_and_address_events_once(netns: None) -> None:
    from xdplb.agent.inventory import NodeChanges

    watch = NodeChanges()  # in the test's own namespace: nothing else changes it
    try:
        assert not watch.changed()
        sh("ip addr add 10.77.0.1/24 dev xa0")
        assert watch.changed() and not watch.changed()  # drained
        sh("ip link add xa2 type veth peer name xa3")
        assert watch.changed()
        sh("ip link del xa2 && ip addr del 10.77.0.1/24 dev xa0")
        assert watch.changed() and not watch.changed()
    finally:
        watch.close()


def tc_ingress(dev: str) -> str:
    return sh(f"tc filter show dev {dev} ingress")


def test_backend_side_tc_ingress_attach_replace_and_detach(dp: loader.DataPlane) -> None:
    dp.attach_backend_side("xa1")
    dp.attach_backend_side("xa1")  # replaced in place
    assert tc_ingress("xa1").count("xdplb_tc_in direct-action") == 1
    assert loader.xdp_state("xa1").prog_id == 0 and "xa1" in loader.attached_interfaces()
    # With XDP attached the filter stays, once: XDP leaves it partial-checksum rewrites.
    assert dp.attach("xa1", "generic") == "generic"
    assert tc_ingress("xa1").count("xdplb_tc_in direct-action") == 1
    assert loader.detach("xa1")
    assert "xdplb_tc_in" not in tc_ingress("xa1")
    dp.attach_backend_side("xa1")
    assert loader.detach("xa1")
    assert "xdplb_tc_in" not in tc_ingress("xa1")
    assert "xa1" not in loader.attached_interfaces()
