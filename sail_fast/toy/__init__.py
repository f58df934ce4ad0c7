"""The toy world, the top of the house: handwritten digits (``world``), a hidden human (``human``) who
labels pairs and judges samples (``labels``, ``metrics``), its base model (``pretrain``), and the
instrument built on them (``experiment``, ``report``). Nothing below imports from here; the SAIL loop
reaches the toy world through ``sail_fast.sail.world``."""

PRETRAIN_STEPS = 1200  # the shipped base model's pretraining steps (toy_model/pretrain.json)
