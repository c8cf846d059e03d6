"""Placeholder while the spf check is being written (replaced wholesale)."""
from __future__ import annotations

from trustmilter.checks.base import CheckContext, CheckResult

NAME = "spf"
DEPENDS: tuple[str, ...] = ()


def run(ctx: CheckContext) -> CheckResult:
    raise NotImplementedError("spf check not written yet")
