"""After distillation: the test-set report, paid fidelity, the privacy audit, the synthetic-to-real gap."""
