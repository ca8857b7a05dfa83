"""The storage fixtures (own database, own schema) for the review tests."""

from tests.storage.conftest import pg_database, pg_schema  # noqa: F401
