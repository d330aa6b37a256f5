"""The observer service: rates answers for alignment and engagement, 1..7 with a reason.

Stateless apart from a cache of world specs; replicas share the load in the ``observer``
queue group.
"""
