"""Prometheus metrics (prometheus-client): per VM state, CPU, memory, disk and network, restarts;
host capacity and allocation; API request latency. Read at scrape time from /proc, cgroups,
QMP and the taps' counters (the dashboard's graphs come from vmkit.daemon.history's sampler)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vmkit.daemon.history import tap_counters
from vmkit.errors import VmkitError
from vmkit.model.resources import memory_limit, vcpu_limit
from vmkit.model.state import VmState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from vmkit.daemon.service import Service


class VmCollector(Collector):
    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        host = self.service.host
        state = GaugeMetricFamily("vmkit_vm_state", "1 for the state the VM is in",
                                  labels=["vm", "state"])
        cpu = CounterMetricFamily("vmkit_vm_cpu_seconds", "CPU time of the VM's QEMU",
                                  labels=["vm"])
        memory = GaugeMetricFamily("vmkit_vm_memory_bytes",
                                   "memory: guest (after the balloon), plugged, QEMU RSS, cgroup",
                                   labels=["vm", "kind"])
        vcpus = GaugeMetricFamily("vmkit_vm_vcpus", "vCPUs online", labels=["vm"])
        disk = CounterMetricFamily("vmkit_vm_disk_bytes", "root disk bytes",
                                   labels=["vm", "direction"])
        disk_ops = CounterMetricFamily("vmkit_vm_disk_ops", "root disk operations",
                                       labels=["vm", "direction"])
        net = CounterMetricFamily("vmkit_vm_network_bytes", "bytes through the VM's taps "
                                  "(user-mode NICs have no counters)",
                                  labels=["vm", "network", "direction"])
        packets = CounterMetricFamily("vmkit_vm_network_packets", "packets through the VM's taps",
                                      labels=["vm", "network", "direction"])
        restarts = CounterMetricFamily("vmkit_vm_restarts", "restarts by the restart policy",
                                       labels=["vm"])
        for vm in host.vms(include_broken=True):
            with contextlib.suppress(VmkitError, OSError):
                status = vm.status()
                for each in VmState:
                    state.add_metric([vm.name, each.value], 1.0 if status.state is each else 0.0)
                restarts.add_metric([vm.name], float(self.service.supervisor.restarts(vm.name)))
                if status.state not in (VmState.RUNNING, VmState.PAUSED):
                    continue
                usage = vm.usage()
                if usage is None:
                    continue
                cpu.add_metric([vm.name], usage.cpu_seconds)
                vcpus.add_metric([vm.name], usage.vcpus)
                memory.add_metric([vm.name, "guest"], usage.memory_actual)
                memory.add_metric([vm.name, "plugged"], usage.memory_plugged)
                memory.add_metric([vm.name, "rss"], usage.rss)
                if usage.cgroup_memory is not None:
                    memory.add_metric([vm.name, "cgroup"], usage.cgroup_memory)
                disk.add_metric([vm.name, "read"], usage.disk_read)
                disk.add_metric([vm.name, "write"], usage.disk_written)
                disk_ops.add_metric([vm.name, "read"], usage.disk_read_ops)
                disk_ops.add_metric([vm.name, "write"], usage.disk_write_ops)
                for tap in tap_counters(status):
                    net.add_metric([vm.name, tap.network, "sent"], tap.sent_bytes)
                    net.add_metric([vm.name, tap.network, "received"], tap.received_bytes)
                    packets.add_metric([vm.name, tap.network, "sent"], tap.sent_packets)
                    packets.add_metric([vm.name, tap.network, "received"], tap.received_packets)
        yield from (state, cpu, memory, vcpus, disk, disk_ops, net, packets, restarts)
        capacity, policy = host.capacity(), host.policy()
        allocated = host.allocated()
        cap = GaugeMetricFamily("vmkit_host_capacity", "what the host has",
                                labels=["resource"])
        cap.add_metric(["cpus"], capacity.cores)
        cap.add_metric(["memory_bytes"], capacity.memory)
        limit = GaugeMetricFamily("vmkit_host_policy_limit",
                                  "what the partitioning policy lets VMs be promised",
                                  labels=["resource"])
        limit.add_metric(["cpus"], vcpu_limit(capacity, policy))
        limit.add_metric(["memory_bytes"], memory_limit(capacity, policy))
        alloc = GaugeMetricFamily("vmkit_host_allocated", "promised to live VMs",
                                  labels=["resource"])
        alloc.add_metric(["cpus"], allocated.cpus)
        alloc.add_metric(["memory_bytes"], allocated.memory)
        ops = GaugeMetricFamily("vmkit_operations_running", "operations not finished")
        ops.add_metric([], len(self.service.operations.running()))
        yield from (cap, limit, alloc, ops)


def build_registry(service: Service) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(VmCollector(service))
    latency = Histogram("vmkit_api_request_seconds", "API request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5, 5, 10, 30))
    return registry, latency
