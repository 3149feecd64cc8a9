"""The stage runtime: inbox/outbox, custody and re-send, dispatch, peers, payload."""
