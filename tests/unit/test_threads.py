"""How many threads a rank gets: the cores it may use (affinity, a container's CPU quota), split among the
ranks on its machine."""

import os

import pytest

from harness import distributed

pytestmark = pytest.mark.unit


def cgroup(tmp_path, v2=None, v1=None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"v2": "max 100000"}, None),
        ({"v2": "200000 100000"}, 2),
        ({"v2": "150000 100000"}, 2),  # 1.5 CPUs: rounded up
        ({"v2": "50000 100000"}, 1),
        ({"v1": (-1, 100000)}, None),
        ({"v1": (300000, 100000)}, 3),
        ({}, None),
    ],
)
def test_a_containers_cpu_quota_is_read_from_its_cgroup(tmp_path, files, quota):
    assert distributed._cpu_quota(cgroup(tmp_path, **files)) == quota


def test_the_cores_are_the_affinity_capped_by_the_quota(tmp_path):
    mine = len(os.sched_getaffinity(0))
    assert distributed.available_cores(cgroup(tmp_path, v2="max 100000")) == mine
    limited = tmp_path / "limited"
    limited.mkdir()
    assert distributed.available_cores(cgroup(limited, v2="100000 100000")) == 1
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    assert distributed.available_cores(cgroup(roomy, v2=f"{100000 * (mine + 8)} 100000")) == mine
