"""Orchestration of the main job (``calibrl-train``), on top of every other layer.

- :mod:`calibrl.run.pipeline`: :func:`~calibrl.run.pipeline.run`, the whole job: validate, build, stages.
- :mod:`calibrl.run.validate`: start-up checks of the composed config.
- :mod:`calibrl.run.build`: :func:`~calibrl.run.build.build` -> :class:`~calibrl.run.build.RunParts`.
- :mod:`calibrl.run.stages`: raw eval, SFT warm-up (with the SFT cache), RL loop, final eval and save.
- :mod:`calibrl.run.guards`: pre-emption flag, non-finite stop, resume state, eval/checkpoint cadence.
- :mod:`calibrl.run.checkpoint`, :mod:`calibrl.run.sft_cache`: resumable checkpoints, stored warm-ups.
"""
