"""Integrations with the libraries where models already live: timm and diffusers.

``dsr_kernels.patch(obj, ...)`` dispatches on what it is given; the per-library entry
points are :func:`dsr_kernels.integrations.timm.patch` and
:func:`dsr_kernels.integrations.diffusers.patch`. Neither library is imported by
``import dsr_kernels``: each integration is imported when it is first used.
"""
