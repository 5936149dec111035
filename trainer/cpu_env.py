"""The process environment the trainer's CPU settings need at start (no torch import: the launcher
reads it before it re-executes itself)."""

from __future__ import annotations

# glibc (>= 2.35) tunable: malloc advises transparent huge pages (madvise(MADV_HUGEPAGE)) on the
# memory it takes from the kernel, so a CPU step's activations sit on 2 MiB pages instead of 4 KiB:
# far fewer TLB misses over the hundreds of MB a step touches (Titans MAC at T=1k on one core:
# 1.59 -> 1.44 s). glibc reads tunables at process start only, so the launcher sets it for the
# processes it starts (launch/cli.py); TITANFORGE_HUGE_PAGES=0 turns it off.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(env: dict[str, str]) -> dict[str, str]:
    """env with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES (kept as it is if the user set a
    glibc.malloc.hugetlb value, or TITANFORGE_HUGE_PAGES=0)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get("TITANFORGE_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def huge_pages_on(env: dict[str, str]) -> bool:
    """Whether glibc started with HUGE_PAGES_TUNABLE (for the trainer's [cpu] line)."""
    return HUGE_PAGES_TUNABLE in env.get("GLIBC_TUNABLES", "")
