"""Parallel learning on the ``members`` mesh axis: many train states stacked on a leading axis, one
vmapped step (populations: ensembles, sweeps, PBT; federated clients), and sharded inference."""
