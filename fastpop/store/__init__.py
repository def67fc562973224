"""Mail storage: Maildirs opened by descriptors (safefs), the per-mailbox
index, mailbox locks, the fsync steps that make writes durable.

Every file under a Maildir is untrusted input (docs/security.md).  Imports
the wire layer and the leaves.
"""
