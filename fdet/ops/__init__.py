"""Pure tensor functions: box geometry, coding, anchors, assignment, losses, postprocessing.

Nothing here imports a module or a spec. Each algorithm lives in one file under its name.
"""
