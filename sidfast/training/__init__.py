"""The distillation loop: ``distill()``, its configuration, the two updates of SiD and SiDA, real data,
run checkpoints and sharding."""
