"""Generation on a Ray cluster (the ``cluster`` extra): ``images``, a Ray Data source of generated images, and
``ddpm-generate --ray`` (``runtime.ray.shards``). Ray is imported only when one of them is used."""

from runtime.ray.dataset import images

__all__ = ["images"]
