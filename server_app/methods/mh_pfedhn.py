"""MH-pFedHN (paper Algorithm 1): a multi-head hypernetwork generates every client's own
parameter vector from its embeddings; clients return "sent minus trained" and the server
turns each delta into a step of the feature extractor, the client's head and its embeddings.

Everything it needs is the hypernetwork family's round (schedules, novel clients) and the
hypernetwork server state; it adds nothing of its own.
"""

from __future__ import annotations

from server_app.hypernetwork_rounds import HypernetworkRounds


class MHpFedHN(HypernetworkRounds):
    pass
