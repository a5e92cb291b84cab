"""Persistence: ORM tables, the session factory, repository functions and migrations."""
