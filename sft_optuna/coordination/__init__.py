"""How workers share one study without a master: the storage and its lock, claims and the budget, heartbeats
and retries of dead workers' trials, checkpoints a retry resumes from, one-statement per-epoch writes.

Sits above ``search`` (a claim asks the sampler); knows nothing of training.
"""
