"""Placeholder while the dmarc check is being written (replaced wholesale)."""
from __future__ import annotations

from trustmilter.checks.base import CheckContext, CheckResult

NAME = "dmarc"
DEPENDS: tuple[str, ...] = ("spf", "dkim", "arc")


def run(ctx: CheckContext) -> CheckResult:
    raise NotImplementedError("dmarc check not written yet")
