"""What the driver and the ranks share: configuration, storage, the checkpoint format and
the run's board."""
