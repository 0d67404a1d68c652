"""Region-based detectors: the region proposal network, the RoI heads that classify and refine
its proposals (one stage for Faster R-CNN, several for Cascade R-CNN) and the mask head of Mask
R-CNN. Each part is a module with pure functions for its targets, losses and postprocess, on
padded ``[B, R]`` proposals with a validity mask."""
