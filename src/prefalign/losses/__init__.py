"""Pure, per-sample preference losses.

``reward`` holds the reward-model objectives (Bradley–Terry, Plackett–Luce) and ``diffusion`` the policy
objectives (Diffusion-DPO, -DRO, -KTO). Every function takes per-sample tensors and returns the per-sample
loss; callers average (docs/design.md, "Loss contract").
"""
