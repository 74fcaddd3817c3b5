"""Fidelity of asynchronous against sequential samples: metrics, the digit classifier, `eval`."""
