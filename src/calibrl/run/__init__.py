"""Orchestration of the main job (``calibrl-train``): build the parts from a composed config and run
the stages (raw eval, warm-up, RL loop, final), with checkpoints, resume and the SFT cache."""
