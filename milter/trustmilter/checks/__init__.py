"""The checks, in one explicit list. Adding a check = a module here + its config section in
data/defaults.yaml + its test file. The pipeline runs every check whose DEPENDS are done,
concurrently, on one DNS session with the message's deadline."""
from __future__ import annotations

from types import ModuleType

from trustmilter.checks import (arc, bayes, dkim, dmarc, dnsbl, helo, iprev, model,
                                reputation, spf, uribl)

ALL: tuple[ModuleType, ...] = (spf, dkim, arc, iprev, helo, dmarc, dnsbl, uribl, reputation,
                               bayes, model)

# YAML rules run after every other check (their DEPENDS name them all) to see their symbols.
from trustmilter.checks import rules  # noqa: E402

ALL += (rules,)
