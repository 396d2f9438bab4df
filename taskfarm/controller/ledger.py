"""The controller's submission ledger: task ids and submission tokens.

Ids are handed out once, ever: by `reserve` (a block a client names in its
submissions later) or to a batch without ids.  A submission token makes a
resend after a lost connection idempotent: the ledger remembers the ids each
token got, and the digest of its bytes, which tells a resend from another
batch under a replayed token.  Both survive a restart through the journal,
and so does the incarnation: the controller's identity, which changes only
when a controller starts without its journal.
"""

from __future__ import annotations

import collections

from taskfarm.errors import BadRequest

#: How many submission tokens are remembered, and for how long (seconds).
MAX_TOKENS = 100_000
TOKEN_LIFETIME = 3600.0

#: The most task ids one `reserve` call sets aside.
MAX_RESERVE = 100_000


class SubmissionLedger:
    """Hands out task ids and remembers submission tokens."""

    def __init__(self, clock, journal) -> None:
        self._clock = clock
        self._journal = journal
        #: Who this controller is: the journal's identity, or a new one per
        #: start without a journal.  Clients that see it change know that
        #: the tasks they sent before are gone, and their reserved ids too.
        self.incarnation: str = journal.incarnation()
        #: The first task id never handed out.
        self.next_id = 0
        #: Submission token -> (first id or -1 for reserved ids, count, digest).
        self._tokens: collections.OrderedDict[str, tuple[int, int, str | None]] = (
            collections.OrderedDict()
        )

    def restore(self) -> None:
        """Take the id counter and the tokens back from the journal."""
        self.next_id = self._journal.next_id()
        for token, first, count, digest in self._journal.tokens():
            self._tokens[token] = (first, count, digest)

    # -- ids --------------------------------------------------------------------------

    def reserve(self, count: int) -> int:
        """Set aside `count` fresh ids; returns the first (journaled, not synced)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_RESERVE:
            raise ValueError("reserve between 1 and %d ids, not %r" % (MAX_RESERVE, count))
        first = self.next_id
        self.next_id += count
        self._journal.next_id_is(self.next_id)
        return first

    def check_reserved(self, ids: list, count: int) -> None:
        """`BadRequest` unless every one of `ids` was handed out before.

        Their form (ints, one per task, distinct) is checked on the way in,
        by `wire.Submission.parse`; here only that they are ours.
        """
        for taskid in ids:
            if not 0 <= taskid < self.next_id:
                raise BadRequest("task id %d was never reserved" % taskid)

    def assign(self, ids: list[int] | None, count: int) -> tuple[list[int], int]:
        """The ids of a new batch of `count` tasks: its reserved `ids`, or
        fresh ones.  Also returns the first fresh id, or -1 if none was
        spent (fresh ids are journaled whether or not the batch is)."""
        first = self.next_id
        if ids is None:
            ids = list(range(first, first + count))
            self.next_id += count
        if self.next_id == first:
            return ids, -1
        self._journal.next_id_is(self.next_id)
        return ids, first

    # -- tokens -------------------------------------------------------------------------

    def resent(self, token: str | None, ids: list[int] | None, digest: str | None):
        """The ids a batch sent before under `token` got, or None if `token`
        is new.  `BadRequest` if the token came with other bytes (`digest`),
        or with reserved ids that this resend leaves out."""
        if token is None or token not in self._tokens:
            return None
        first, count, known_digest = self._tokens[token]
        if digest is not None and known_digest is not None and digest != known_digest:
            raise BadRequest(
                "submission token %s was already used for another batch; "
                "every batch needs a token of its own" % token
            )
        if first >= 0:
            return list(range(first, first + count))
        if ids is None:
            raise BadRequest("this submission token came with reserved ids; send them again")
        return list(ids)

    def remember(self, token: str, first: int, count: int, digest: str | None) -> None:
        """Note the batch `token` brought (the oldest tokens go past MAX_TOKENS)."""
        self._tokens[token] = (first, count, digest)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)

    def token_row(self, token: str, now: float) -> tuple:
        """The journal's row for a remembered `token`."""
        first, count, digest = self._tokens[token]
        return (token, first, count, digest, now)

    def forget(self, token: str) -> None:
        """Forget `token` (its batch was refused: a resend is a new batch)."""
        self._tokens.pop(token, None)

    def forget_old_tokens(self) -> None:
        """Drop journaled tokens older than TOKEN_LIFETIME (run by the sweep)."""
        self._journal.forget_tokens(self._clock.seconds() - TOKEN_LIFETIME)

    def __contains__(self, token: str) -> bool:
        return token in self._tokens

    def __len__(self) -> int:
        """How many tokens are remembered."""
        return len(self._tokens)
