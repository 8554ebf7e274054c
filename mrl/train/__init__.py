"""Training, shared by both training scripts: the run's bookkeeping (run), the epoch and step (loop), resumable
checkpoints (checkpoint), optimizers and schedules (optim), the per-dataset recipes (recipes), preemption and NaN guards
(guards, supervise), and the Hub upload at the end (publish)."""
