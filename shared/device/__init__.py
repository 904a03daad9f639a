"""The device runtime: load a base model, train an adapter locally, send the delta.

Imported by devices (and by the evaluation task); the aggregation path never needs it.
"""
