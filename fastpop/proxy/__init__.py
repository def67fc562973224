"""``fastpop proxy``: a POP3 proxy that routes each user to their backend.

The proxy is a fastpop server whose sessions, once the user has logged in
at the proxy, relay the connection to a backend instead of opening a
Maildir (``fastpop.proxy.relay``); ``fastpop.proxy.routing`` picks the
backend (the user's ``host`` field, else a rendezvous hash of the name over
``[backends] servers``) and checks the backends' health.  Everything before
the login (listeners, STLS, implicit TLS, PROXY headers from HAProxy,
penalties, the failure delay and its log line) is the server's own.
"""
