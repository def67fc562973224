"""Mail in: delivery into Maildirs (local), the LMTP server, ``fastpop
deliver`` (cli) and importing other servers' mailboxes (legacy_import).

Imports auth, store, wire and the leaves; never the session layer.
"""
