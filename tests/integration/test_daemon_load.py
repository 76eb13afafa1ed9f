"""Load: 50 concurrent clients read while 10 VMs start and 5 memory snapshots run. No request
may fail; the p99 latency of GET /1.0/vms is printed (target <= 50 ms, reported in the note).

Each client polls like a dashboard: a request, then THINK seconds. (Without think time the 50
client threads of this test process need a core of their own, on a 2-core host that also runs
10 TCG guests: the figure would measure the load generator.)"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import running_daemon

CLIENTS = 50
VMS = 10
SNAPSHOTS = 5
THINK = 0.1


def test_fifty_readers_while_vms_start_and_snapshot(image_home: Path) -> None:
    with new_home(image_home) as home, running_daemon(home) as daemon:
        with daemon.unix_http() as client:
            # 10 one-vCPU VMs on 2 cores: beyond the default 4x vCPU promise, by policy
            policy = client.put("/1.0/host/policy", json={"vcpu_ratio": 8.0})
            assert policy.json()["metadata"]["vcpu_ratio"] == 8.0
            for n in range(VMS):
                created = client.post("/1.0/vms", json={"name": f"load{n}", "memory": "192M"})
                assert created.status_code == 202
                client.get(f"{created.headers['Location']}/wait", params={"timeout": 120})
        # the clients run in 5 processes of 10 threads: one Python process would measure its
        # own GIL more than the daemon
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        results: Any = context.Queue()
        workers = [context.Process(target=_client_process,
                                   args=(str(daemon.socket), range(p, CLIENTS, 5), stop,
                                         results)) for p in range(5)]
        for worker in workers:
            worker.start()
        try:
            with daemon.unix_http() as client:
                ops = [client.put(f"/1.0/vms/load{n}/state", json={"action": "start"})
                       for n in range(VMS)]
                for op in ops:
                    done = client.get(f"{op.headers['Location']}/wait",
                                      params={"timeout": 600}).json()["metadata"]
                    assert done["status"] == "success", done.get("error")
                ops = [client.post(f"/1.0/vms/load{n}/snapshots", json={"name": "snap"})
                       for n in range(SNAPSHOTS)]
                for op in ops:
                    done = client.get(f"{op.headers['Location']}/wait",
                                      params={"timeout": 600}).json()["metadata"]
                    assert done["status"] == "success", done.get("error")
                listing = client.get("/1.0/vms").json()["metadata"]
                metrics = client.get("/1.0/metrics").text
        finally:
            stop.set()
            latencies: list[float] = []
            failures: list[str] = []
            for _ in workers:
                theirs, failed = results.get(timeout=120)
                latencies += theirs
                failures += failed
            for worker in workers:
                worker.join(timeout=60)
        assert not failures, failures[:5]
        assert sum(1 for vm in listing if vm["state"] == "running") == VMS
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\nGET /1.0/vms under load ({CLIENTS} clients polling every {THINK}s, {VMS} "
              f"VMs starting, "
              f"{SNAPSHOTS} snapshots): {len(latencies)} requests, p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms (target 50 ms)")
        assert len(latencies) > 100
        served = _server_side(metrics, "/1.0/vms")
        print(f"the daemon's own latency histogram for GET /1.0/vms: {served}")


def _client_process(socket_path: str, indexes: range, stop: Any, results: Any) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def reader(index: int) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                          base_url="http://vmkit", timeout=60) as mine:
            paths = ["/1.0/vms", "/1.0/vms", f"/1.0/vms/load{index % VMS}?query=false",
                     "/1.0/operations"]
            n = 0
            while not stop.is_set():
                path = paths[n % len(paths)]
                n += 1
                started = time.perf_counter()
                try:
                    response = mine.get(path)
                    ok = response.status_code == 200
                    detail = f"{path}: {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{path}: {exc!r}"
                elapsed = time.perf_counter() - started
                with lock:
                    if not ok:
                        failures.append(detail)
                    elif path == "/1.0/vms":
                        latencies.append(elapsed)
                stop.wait(THINK)

    threads = [threading.Thread(target=reader, args=(i,)) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, failures))


def _server_side(metrics: str, route: str) -> str:
    """Bucket counts of the daemon's latency histogram for one route (up to 100 ms)."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("vmkit_api_request_seconds_bucket") and f'route="{route}"' in line \
                and 'method="GET"' in line and 'status="200"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(f"<= {bound}s: {int(float(line.rsplit(' ', 1)[1]))}")
    return ", ".join(buckets[:8])
