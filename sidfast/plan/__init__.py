"""``sidfast plan``: the per-GPU memory of a distill run, predicted before GPUs are rented (``docs/plan.md``)."""
from sidfast.plan.memory import MemoryPlan, plan_memory, predictions_table

__all__ = ["MemoryPlan", "plan_memory", "predictions_table"]
