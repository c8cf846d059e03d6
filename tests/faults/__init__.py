"""Fault tests (issue 6, item 2): each fault around the milter, through a real Postfix, with what
the sender and the queue see, and nothing lost. Run: ``.venv/bin/pytest tests/faults -q`` (root,
postfix installed; the state faults also mount a small tmpfs).

- DNS down / slow past the deadline / SERVFAIL / TCP-only answers: test_dns_faults.py
- SQLite state locked by a long writer / read-only / full disk: test_state_faults.py
- content model missing or corrupt at start and at reload: test_model_faults.py
- config and rules reload under load; a worker process SIGKILLed: test_pool_faults.py
- a rule file broken at reload: tests/integration/test_verdicts_postfix.py::
  test_broken_rules_at_reload_keep_the_running_set_under_traffic
- the milter SIGKILLed mid-message and restarted: tests/integration/test_milter_postfix.py::
  test_milter_killed_mid_run_mail_waits_and_arrives_after_restart
"""
