"""trainer/cpu_env.py: the environment `titanforge train` starts its processes with (launch/cli.py)."""

from titanforge.trainer.cpu_env import HUGE_PAGES_TUNABLE, huge_pages_env, huge_pages_on


def test_huge_pages_tunable_joins_the_users_tunables_and_respects_opt_out():
    assert huge_pages_env({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:" + HUGE_PAGES_TUNABLE)
    # The user's own hugetlb setting and the opt-out are left alone.
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert huge_pages_env({"TITANFORGE_HUGE_PAGES": "0"}) == {"TITANFORGE_HUGE_PAGES": "0"}


def test_huge_pages_on_reads_what_huge_pages_env_sets():
    assert huge_pages_on(huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}))
    assert not huge_pages_on({}) and not huge_pages_on({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
