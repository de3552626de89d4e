"""Which runner trains which cell now: a lease table kept as tags of the experiment's parent MLflow run.

Why the tracking store and not Ray: it is the one thing every runner of an experiment shares, whether the
runners submit to one Ray cluster, to two clusters, or each start a private local instance on one machine; a
named Ray actor would be seen only inside one cluster. It is also where a cell's result is recorded, so a
runner that holds a cell's lease and finds the cell finished there skips it.

Protocol (announce, then check). A runner (an *owner*, a random id) keeps the tag ``medgcsam.heartbeat/<owner>``
fresh (its clock, rewritten every ttl/4). To take a cell it writes ``medgcsam.lease/<cell>/<owner>`` and then
reads the parent's tags: if another live owner claims the same cell, it deletes its own claim and tries later.
Two runners may both withdraw (each retries after a random delay), but they never both keep a claim: the claim
written second is written after the first one, so the second owner's check sees the first (the store is
read-after-write consistent: sqlite, or an MLflow server in front of a SQL database). An owner whose heartbeat
is older than the ttl is dead: its claims are ignored and swept. The holder fences itself: when it could not
renew its heartbeat for half the ttl, or finds its claim gone or contested, it gives the cell up (the
scheduler stops its task) before another runner can take it over. Clocks of the machines must agree to well
within the ttl (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

LEASE_PREFIX = "medgcsam.lease/"  # + <cell id>/<owner>: JSON {host, pid, since}
HEARTBEAT_PREFIX = "medgcsam.heartbeat/"  # + <owner>: the owner's clock (s since the epoch) at its last renewal


class LeaseTable:
    """One runner's view of the cell leases of one experiment (the tags of its parent run)."""

    def __init__(self, client: MlflowClient, parent_run_id: str, ttl_s: float):
        self.client = client
        self.run_id = parent_run_id
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex[:16]
        self.held: set[str] = set()
        self._renewed = time.monotonic()  # when our heartbeat was last written: fencing uses our own clock

    # ---- reading ---------------------------------------------------------------------------------
    def _claims(self) -> tuple[dict[str, set[str]], set[str]]:
        """Cell id -> owners that claim it, and the owners alive now; sweeps what dead owners left behind."""
        tags = self.client.get_run(self.run_id).data.tags
        now = time.time()
        alive = {k[len(HEARTBEAT_PREFIX):] for k, v in tags.items()
                 if k.startswith(HEARTBEAT_PREFIX) and now - float(v) <= self.ttl_s}
        claims: dict[str, set[str]] = {}
        for key in tags:
            if key.startswith(LEASE_PREFIX):
                cell, _, owner = key[len(LEASE_PREFIX):].partition("/")
                claims.setdefault(cell, set()).add(owner)
        owners = {k[len(HEARTBEAT_PREFIX):] for k in tags if k.startswith(HEARTBEAT_PREFIX)}
        dead = [HEARTBEAT_PREFIX + o for o in owners - alive - {self.owner}]
        dead += [f"{LEASE_PREFIX}{c}/{o}" for c, who in claims.items() for o in who - alive - {self.owner}]
        for key in dead:
            self._delete(key)
        return claims, alive

    def holders(self) -> dict[str, set[str]]:
        """Cell id -> the live owners other than us that claim it (cells another runner is training)."""
        claims, alive = self._claims()
        out = {cell: (owners & alive) - {self.owner} for cell, owners in claims.items()}
        return {cell: owners for cell, owners in out.items() if owners}

    # ---- writing ---------------------------------------------------------------------------------
    def beat(self) -> set[str]:
        """Renew our heartbeat; returns the held cells we must give up (claim gone or contested, or the heartbeat
        not renewed for half the ttl: another runner may take them over soon)."""
        try:
            self.client.set_tag(self.run_id, HEARTBEAT_PREFIX + self.owner, f"{time.time():.3f}")
            self._renewed = time.monotonic()
            claims, alive = self._claims()
        except Exception as exc:  # any failure to reach the store counts the same: not renewed
            if time.monotonic() - self._renewed > self.ttl_s / 2:
                log.error("cannot renew the cell leases for %.0f s (%s); giving up %d cells",
                          time.monotonic() - self._renewed, exc, len(self.held))
                return set(self.held)
            log.warning("cannot renew the cell leases (%s); retrying", exc)
            return set()
        return {cell for cell in self.held
                if self.owner not in claims.get(cell, set()) or (claims[cell] & alive) - {self.owner}}

    def acquire(self, cell_id: str) -> bool:
        """Claim ``cell_id``; False when another live runner claims it too (then ours is withdrawn)."""
        key = f"{LEASE_PREFIX}{cell_id}/{self.owner}"
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3)}
        self.client.set_tag(self.run_id, key, json.dumps(holder))
        claims, alive = self._claims()
        if (claims.get(cell_id, set()) & alive) - {self.owner}:
            self._delete(key)
            return False
        self.held.add(cell_id)
        return True

    def release(self, cell_id: str) -> None:
        self.held.discard(cell_id)
        self._delete(f"{LEASE_PREFIX}{cell_id}/{self.owner}")

    def close(self) -> None:
        """Release every claim and the heartbeat (a runner that is killed instead expires after the ttl)."""
        for cell in list(self.held):
            self.release(cell)
        self._delete(HEARTBEAT_PREFIX + self.owner)

    def _delete(self, key: str) -> None:
        with contextlib.suppress(MlflowException):  # already gone: another runner swept it at the same time
            self.client.delete_tag(self.run_id, key)
