"""Drivers for the outside world: PostgreSQL, Redis (and later PDF, SMTP). No business rules here."""
