"""Training loops: the demo base model, the reward model, and the policies (Diffusion-DPO / -DRO).

Loops take typed config sections and a metrics callback; the maths lives in ``prefalign.losses``.
"""
