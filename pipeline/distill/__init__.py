"""TransKD distillation methods and baselines (see ../shared/TRANSKD.md)."""
