"""Pixel geometry and resampling: boxes (boxes) and 3x3 mappings (mappings) of an original image, rendered by PIL
(pil) or on any torch device (device).

Coordinates are continuous pixel coordinates: pixel (row i, col j) covers [j, j+1] x [i, i+1] and its centre is
(j + 0.5, i + 0.5). A box (x0, y0, x1, y1) is a region of an image in these coordinates and may reach beyond it.
A mapping is a 3x3 matrix M taking an output point (x, y, 1) to the point M @ (x, y, 1) of the ORIGINAL image.
Mappings compose by matrix product: if op A is applied first and op B then, on A's output, the whole mapping is
M_A @ M_B (each op's matrix takes its output to its input).
"""
