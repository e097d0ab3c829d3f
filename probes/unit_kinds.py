"""The unit kinds an expert-monosemanticity run compares and their display labels.

Constants only (no torch), so the app's Experts page can label its figures without loading the
measuring code.
"""

KINDS = ("moe", "moefied", "sae", "neuron")
KIND_LABELS = {"moe": "MoE experts", "moefied": "MoEfied experts", "sae": "SAE latents", "neuron": "MLP neurons"}
