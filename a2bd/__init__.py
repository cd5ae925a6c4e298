"""a2bd: real-time call authorization, live credit control and rating for Asterisk."""

__version__ = "0.1.0"
