"""A run into a folder: ddpm-generate (the CLI and the run), the output folder, atomic files, images and class
labels."""
