"""Placeholder while the arc check is being written (replaced wholesale)."""
from __future__ import annotations

from trustmilter.checks.base import CheckContext, CheckResult

NAME = "arc"
DEPENDS: tuple[str, ...] = ()


def run(ctx: CheckContext) -> CheckResult:
    raise NotImplementedError("arc check not written yet")
