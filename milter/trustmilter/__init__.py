"""trustmilter: inbound mail trust and spam filter.

The package reads as the pipeline: ``message`` parses, ``checks`` produce symbols,
``scoring`` turns them into a ``Verdict``; ``pipeline.evaluate`` ties them together and
is the one entry point that ``server`` (the milter), ``scan`` and the benchmarks call.
"""
from trustmilter.types import Action, AuthStatus, Envelope, Symbol, Verdict

__version__ = "0.1.0"
__all__ = ["Action", "AuthStatus", "Envelope", "Symbol", "Verdict", "__version__"]
