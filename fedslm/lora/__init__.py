"""LoRA, shared by the coordinator and every site.

- `adapter`: attach LoRA to a base model (A from the seed all sites share, A frozen for
  FFA) and move its tensors in and out through peft's checked doors;
- `algebra`: sums of B A products in factored form (norms, differences, truncated SVD);
- `schemes`: fedavg / ffa / exact / stack, what a site trains and how replies combine;
- `grad_sample`: per-sample gradients of LoRA factors inside their own backward (DP).
"""
