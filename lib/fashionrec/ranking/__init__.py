"""The ranking core: one store interface, the ranking policies and the metrics of a ranking, shared by serving and
evaluation."""
