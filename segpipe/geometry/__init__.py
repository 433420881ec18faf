"""Pure geometry and pixel rules (numpy only): tile grids and windows, stitching sinks, the
channel layout and dtype rules every reader and model shares."""
