"""PBNDS backend: job format, shading library (classical and neural), renderer and local service.

Never imports bpy: everything here runs without Blender.
"""

__version__ = "0.1.0"
