"""The POP3 wire: command codes and the pull parser (compiled, with its
pure-Python twin), fixed replies, dot-stuffing, PROXY protocol headers.

Bytes in, bytes out: no I/O, no knowledge of mailboxes or users.  Imports
only the leaf modules at the top of fastpop/.
"""
