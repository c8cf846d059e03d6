"""Placeholder while the dkim check is being written (replaced wholesale)."""
from __future__ import annotations

from trustmilter.checks.base import CheckContext, CheckResult

NAME = "dkim"
DEPENDS: tuple[str, ...] = ()


def run(ctx: CheckContext) -> CheckResult:
    raise NotImplementedError("dkim check not written yet")
