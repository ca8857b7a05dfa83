"""Adversarial tests: each starts a real ``exai serve`` process and attacks it (see harness)."""
