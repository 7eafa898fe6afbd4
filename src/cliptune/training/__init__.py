"""The training recipe (`Trainer`) and the parts it composes: losses, accumulation, schedule,
checkpoints and the run log."""
