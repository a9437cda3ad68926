"""The sharded core: mesh, rules, gradient strategies (accumulator, pipeline), the train step, data.

It imports nothing of the run harness (:mod:`shardml.run`) or the analysis tools.
"""
