"""The contract with the dialplan (DESIGN.md section 4): the channel variables a2bd sets.

asterisk_conf/extensions.conf reads exactly these; tests/unit/test_asterisk_conf.py checks both ways.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A2B_STATUS values. Every value but OK is a refusal with its own Q.850 cause."""

    OK = "OK"
    NOFUNDS = "NOFUNDS"
    MAXCALLS = "MAXCALLS"
    DAILYLIMIT = "DAILYLIMIT"  # the account's (device's) daily minute limit is used up
    BLOCKED = "BLOCKED"
    EXPIRED = "EXPIRED"
    NOACCOUNT = "NOACCOUNT"
    NORATE = "NORATE"
    NOROUTE = "NOROUTE"
    ERROR = "ERROR"


# Q.850 causes for Hangup(${A2B_HANGUPCAUSE}). Chosen so the caller's phone shows something true:
# 21 call rejected; 34 no circuit (a capacity limit); 1 unallocated number (no such destination);
# 3 no route to destination; 38 network out of order (we could not decide).
HANGUP_CAUSE: dict[Status, int] = {
    Status.OK: 16,
    Status.NOFUNDS: 21,
    Status.MAXCALLS: 34,
    Status.DAILYLIMIT: 34,
    Status.BLOCKED: 21,
    Status.EXPIRED: 21,
    Status.NOACCOUNT: 21,
    Status.NORATE: 1,
    Status.NOROUTE: 3,
    Status.ERROR: 38,
}

VAR_STATUS = "A2B_STATUS"
VAR_HANGUPCAUSE = "A2B_HANGUPCAUSE"
VAR_LIMIT_MS = "A2B_LIMIT_MS"
VAR_ROUTES = "A2B_ROUTES"
VAR_ROUTE_PREFIX = "A2B_ROUTE_"  # A2B_ROUTE_1 .. A2B_ROUTE_<A2B_ROUTES>
VAR_ACCOUNT = "A2B_ACCOUNT"
VAR_ACCOUNTCODE = "CHANNEL(accountcode)"  # not CDR(accountcode): deprecated, logs a WARNING per call

# What the dialplan may read (A2B_ROUTE_n stands for the numbered family).
DIALPLAN_VARIABLES = frozenset(
    {VAR_STATUS, VAR_HANGUPCAUSE, VAR_LIMIT_MS, VAR_ROUTES, VAR_ACCOUNT, VAR_ROUTE_PREFIX + "n"}
)
