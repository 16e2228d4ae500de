"""moezoo.zoo.models: one file per model family. Importing a family registers its entrypoints."""

from . import dit_moe  # noqa: F401
from . import moe_fusion  # noqa: F401
from . import mofme  # noqa: F401
from . import moe_vlm  # noqa: F401
from . import unimoe_audio  # noqa: F401
