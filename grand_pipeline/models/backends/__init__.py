"""Built-in backends. Importing this package registers them all in ``roles.BACKENDS``."""

from grand_pipeline.models.backends import (  # noqa: F401
    colour_attributes,
    efficientnet_tagger,
    ground_plane_depth,
    litemedsam,
    minilm,
    nanodet,
    region_tagger,
)
