"""Who may log in: the authenticator, user databases (passwd-file, SQL,
LDAP), password schemes, SASL mechanisms as I/O-free generators, OAuth
token validators, failure penalties and LOGIN-DELAY.

Imports the store and wire layers and the leaves.
"""
