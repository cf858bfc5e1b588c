"""Adapters to other libraries' training loops (``zo.integrations.transformers``: ZOTrainer).

Nothing is imported here: each adapter loads its library only when it is imported itself,
so ``import zo`` stays light.
"""
