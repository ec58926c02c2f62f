"""Sharpness ``λ_max(∇²f)``: the public names of ``moxco.curvature`` under their original module.

``hvp``, ``power_iteration``, ``top_eigenvalue`` (now Lanczos: the algebraic top eigenvalue),
``extreme_eigenvalues``, ``EigenResult`` and the warm tracker ``Sharpness`` live in
``moxco.curvature`` (operators, solvers, tracker); this module re-exports them.
"""

from moxco.curvature import (  # noqa: F401
    EigenResult, Sharpness, extreme_eigenvalues, fd_hvp, hessian_trace, hvp, power_iteration, top_eigenvalue,
)

__all__ = ["EigenResult", "Sharpness", "extreme_eigenvalues", "fd_hvp", "hessian_trace", "hvp", "power_iteration",
           "top_eigenvalue"]
