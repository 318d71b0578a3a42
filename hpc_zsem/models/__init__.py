"""Generative patch models. ``build_model(config)`` picks one by ``model.name``."""
from __future__ import annotations

from hpc_zsem.models.base import PatchModel, PatchSummary


def build_model(config) -> PatchModel:
    """The model a validated config asks for."""
    if config.model.name == "gpmm":
        from hpc_zsem.models.gpmm import GPMM

        return GPMM(config.model.C, gamma=config.model.gamma)
    from hpc_zsem.models.sssc import SSSC
    from hpc_zsem.variational.evolution import EvolutionSettings

    t = config.truncation
    settings = EvolutionSettings(S=t.S, parents=t.parents, children=t.children, generations=t.generations,
                                 selection=t.selection, mutation=t.mutation, crossover=t.crossover)
    return SSSC(config.model.H, settings, psi=config.model.psi, init=config.model.init, sigma=config.model.sigma)


__all__ = ["PatchModel", "PatchSummary", "build_model"]
