"""The ranking core: one store interface and the ranking policies, shared by serving and evaluation."""
