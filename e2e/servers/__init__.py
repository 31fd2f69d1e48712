"""Real HTTP servers used by the RevenProx e2e tests and by the demo."""
