"""The dashboard's pure parts: graph points from counters, and the session checks."""

from __future__ import annotations

from pathlib import Path

from vmkit.daemon.history import Reading, host_point, rates
from vmkit.daemon.web import (
    COOKIE,
    Sessions,
    cookie_header,
    csrf_ok,
    foreign_origin,
    same_origin,
    session_id,
)


def _reading(at: float, cpu: float, disk: int, net: int) -> Reading:
    return Reading(time=at, cpu_seconds=cpu, rss=100 << 20, guest_memory=256 << 20,
                   disk_read=disk, disk_written=2 * disk, net_received=net, net_sent=net // 2)


def test_rates_are_per_second_and_one_core_is_100_percent() -> None:
    point = rates(_reading(10, 5.0, 1000, 4000), _reading(12, 6.5, 5000, 8000))
    assert point["cpu_percent"] == 75.0
    assert point["disk_read_bps"] == 2000.0 and point["disk_write_bps"] == 4000.0
    assert point["net_rx_bps"] == 2000.0 and point["net_tx_bps"] == 1000.0
    assert point["memory_bytes"] == 100 << 20 and point["time"] == 12


def test_a_counter_that_went_back_after_a_restart_is_zero_not_negative() -> None:
    point = rates(_reading(10, 50.0, 10_000, 10_000), _reading(12, 0.5, 10, 10))
    assert point["cpu_percent"] == 0 and point["disk_read_bps"] == 0
    assert point["net_rx_bps"] == 0


def test_host_totals_sum_the_vms_sampled_at_that_moment() -> None:
    a = rates(_reading(0, 0, 0, 0), _reading(2, 1, 0, 0))
    b = rates(_reading(0, 0, 0, 0), _reading(2, 3, 0, 0))
    total = host_point(2, [a, b])
    assert total["cpu_percent"] == 200.0 and total["running"] == 2
    assert total["memory_bytes"] == 2 * (100 << 20)
    assert host_point(4, [])["running"] == 0


def test_a_session_is_found_only_by_its_own_cookie_and_ends_on_close() -> None:
    sessions = Sessions()
    sid, session = sessions.open("alice", "0" * 64)
    # another app on the same host name may set cookies vmkit does not understand
    header = {b"cookie": f'grafana={{"theme":"dark"}}; {COOKIE}={sid}'.encode()}
    assert session_id(header) == sid and sessions.get(sid) is session
    assert sessions.get(COOKIE) is None and sessions.get(None) is None
    assert session_id({b"cookie": COOKIE.encode()}) is None  # malformed: no session
    assert session_id({b"cookie": b"vmkit_session=" + sid.encode()}) is None  # not the name
    # a second cookie of vmkit's name (planted by another site on this host) never wins
    planted = {b"cookie": f"{COOKIE}={sid}; {COOKIE}=evil".encode()}
    assert session_id(planted) is None
    sessions.close(sid)
    assert sessions.get(sid) is None


def test_csrf_needs_the_sessions_own_value() -> None:
    _, session = Sessions().open("alice", "0" * 64)
    assert csrf_ok(session, {b"x-vmkit-csrf": session.csrf.encode()})
    assert not csrf_ok(session, {b"x-vmkit-csrf": b"guess"})
    assert not csrf_ok(session, {b"x-vmkit-csrf": "é".encode("latin-1")})  # no TypeError
    assert not csrf_ok(session, {})


def test_a_websocket_must_come_from_the_daemons_own_origin() -> None:
    host = {b"host": b"198.18.0.1:8443"}
    assert same_origin({**host, b"origin": b"https://198.18.0.1:8443"})
    assert not same_origin({**host, b"origin": b"https://evil.example"})
    assert not same_origin({**host, b"origin": b"http://198.18.0.1:8443"})
    assert not same_origin(host)
    # any request from another site's page is foreign; one without Origin (the CLI) is not
    assert foreign_origin({**host, b"origin": b"https://evil.example"})
    assert foreign_origin({**host, b"origin": b"null"})
    assert not foreign_origin({**host, b"origin": b"https://198.18.0.1:8443"})
    assert not foreign_origin(host)


def test_the_cookie_is_http_only_secure_and_same_site_strict() -> None:
    cookie = cookie_header("abc")
    assert cookie.startswith(f"{COOKIE}=abc;") and COOKIE.startswith("__Host-")
    assert all(part in cookie for part in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"))
    assert "Max-Age=0" in cookie_header("", clear=True)


def test_sessions_outlive_a_restart_and_the_file_holds_no_session_id(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    sid, session = Sessions(path).open("alice", "ab" * 32)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sid not in path.read_text() and "ab" * 32 in path.read_text()
    again = Sessions(path)
    found = again.get(sid)
    assert found is not None and found.csrf == session.csrf and found.user == "alice"
    again.close(sid)
    assert Sessions(path).get(sid) is None
    path.write_text("{not json")
    assert Sessions(path).get(sid) is None  # a damaged file is no session, not a crash
