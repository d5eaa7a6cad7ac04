"""ddpm-eval: scoring a folder of generated images against FashionMNIST (FCD, KID, class agreement)."""
