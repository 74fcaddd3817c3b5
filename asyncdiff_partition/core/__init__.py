"""The torch-free core: op graph, partitioner, plan and profile files, the schedule table.

Imports numpy and networkx only, never torch or diffusers, so that planning, loading plans and
checking them cost no deep-learning import (a test keeps it so).
"""
