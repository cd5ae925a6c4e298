"""HTTP endpoints: /metrics for Prometheus (the admin API comes with invoicing)."""
