"""Pure, synchronous business rules: money, rating, tariff lookup, authorization decisions.

Nothing here imports asyncio, Redis, SQL or anything else of a2bd outside this package.
"""
