"""ctxsync: named key/value contexts kept in sync between machines, peer to peer, as Yjs CRDTs."""

__version__ = "0.1.0"
