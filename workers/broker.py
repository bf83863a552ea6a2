"""The Redis transport the workers use: kombu's, made safe for a connection lost mid-task.

Two kombu 5.7 behaviours stop a whole worker when Redis restarts (both seen in
tests/integration/test_faults.py as "Unrecoverable error: AttributeError: 'NoneType' object
has no attribute ..."):

* when the lost connection's channel closes, kombu pushes every message it delivered and
  was not acked back onto its queue, through a connection object that is already gone; where
  it works it would also requeue tasks still running in the pool, so they would run twice;
* a task that was running across the reconnection acks (or rejects) its message through the
  old, closed channel when it ends.

This channel does neither: such messages stay in the ``unacked`` hash, and the recovery sweep
(``workers.recovery``) settles them: dropped once their job ended, restored to their queue when
no live worker holds them any more. Nothing is lost or run twice; a job message whose
reservation was dropped with the old connection (prefetched, not started) is restored within
three heartbeat periods.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):
    do_restore = False  # no restore of delivered messages when the channel closes

    def _detached(self) -> bool:
        return self.closed or self.connection is None

    def basic_ack(self, delivery_tag, multiple=False):
        if self._detached():
            log.warning("message %s ended after its broker connection was lost: its ack is "
                        "left to the recovery sweep", delivery_tag)
            return None
        return super().basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag, requeue=False):
        if self._detached():
            log.warning("message %s rejected after its broker connection was lost: left to "
                        "the recovery sweep", delivery_tag)
            return None
        return super().basic_reject(delivery_tag, requeue=requeue)


class Transport(kombu_redis.Transport):
    Channel = Channel
