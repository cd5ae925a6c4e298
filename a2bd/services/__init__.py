"""The glue between the protocols (agi, ami) and the domain and adapters."""
