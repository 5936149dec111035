"""launch/cli.py: the environment `titanforge train` starts its processes with."""

from titanforge.launch.cli import HUGE_PAGES_TUNABLE, huge_pages_env


def test_huge_pages_tunable_joins_the_users_tunables_and_respects_opt_out():
    assert huge_pages_env({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:" + HUGE_PAGES_TUNABLE)
    # The user's own hugetlb setting and the opt-out are left alone.
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert huge_pages_env({"TITANFORGE_HUGE_PAGES": "0"}) == {"TITANFORGE_HUGE_PAGES": "0"}
