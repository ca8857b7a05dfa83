"""exai.testing."""
