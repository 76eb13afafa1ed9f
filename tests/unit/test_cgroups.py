"""Both cgroup drivers against a fake tree: the same limits become the right file writes."""

from pathlib import Path

from vmkit.isolation.cgroups import CgroupLimits, CgroupV1, CgroupV2, detect

LIMITS = CgroupLimits(cpu_weight=200, cpu_limit=25.0, memory=768 << 20, pids=512)


def test_v1_writes_shares_quota_memory_and_pids(tmp_path: Path) -> None:
    for controller in CgroupV1.CONTROLLERS:
        (tmp_path / controller).mkdir()
    driver = detect(tmp_path)
    assert isinstance(driver, CgroupV1)
    driver.apply("web", LIMITS)
    cpu = tmp_path / "cpu/vmkit/web"
    assert (cpu / "cpu.shares").read_text() == "2048"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (tmp_path / "memory/vmkit/web/memory.limit_in_bytes").read_text() == str(768 << 20)
    assert (tmp_path / "pids/vmkit/web/pids.max").read_text() == "512"
    driver.apply("web", CgroupLimits(100, None, 1 << 30, 512))  # live change, no cap
    assert (cpu / "cpu.cfs_quota_us").read_text() == "-1"
    assert (cpu / "cpu.shares").read_text() == "1024"


def test_v2_writes_weight_max_memory_and_pids(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io")
    (tmp_path / "cgroup.subtree_control").write_text("")
    driver = detect(tmp_path)
    assert isinstance(driver, CgroupV2)
    driver.apply("web", LIMITS)
    folder = tmp_path / "vmkit/web"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (tmp_path / "vmkit/cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (folder / "cpu.weight").read_text() == "200"
    assert (folder / "cpu.max").read_text() == "25000 100000"
    assert (folder / "memory.max").read_text() == str(768 << 20)
    assert (folder / "pids.max").read_text() == "512"
    (folder / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    (folder / "memory.current").write_text("4096")
    usage = driver.usage("web")
    assert (usage.cpu_ns, usage.memory) == (1_500_000, 4096)


def test_no_tree_means_no_driver(tmp_path: Path) -> None:
    assert detect(tmp_path) is None
