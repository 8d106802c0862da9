"""The driver's side: what runs in the process that calls ``Trainer.fit``."""
