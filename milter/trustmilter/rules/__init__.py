"""YAML rules: ``loader`` turns rule files into a compiled ``RuleSet``, ``engine`` evaluates it
against one message, ``fixtures`` runs the example messages that ship beside the rules, ``cli``
adds ``trustmilter rules check`` and ``trustmilter rules test``. The check that runs them in the
pipeline is ``trustmilter.checks.rules``."""
