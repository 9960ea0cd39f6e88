"""unlearnkit: the helper package of a hands-on course in machine unlearning.

The lessons live in the repository's ``notebooks/``; this package holds everything more than one
lesson needs: data and splits (:mod:`.data`), models (:mod:`.models`), training (:mod:`.train`),
evaluation (:mod:`.evaluate`), figures (:mod:`.plots`) and the unlearning methods
(:mod:`.methods`).
"""

import warnings

from .data import (
    ImageDataset,
    Split,
    check_split,
    class_split,
    load_dataset,
    make_split,
    random_split,
    request_sequence,
)
from .device import get_device, seed_everything
from .evaluate import comparison_table
from .models import model_for
from .train import Recipe, default_recipe, fit

__version__ = "0.1.0"

# PyTorch deprecates torch.jit.script, yet calls it itself the first time forward-mode AD runs (torch.func.jvp), and
# torch-geometric calls it on import: the warning names nothing a learner's code can change, so the kit hides that one
# message (a lesson imports the kit before torch-geometric for this).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

#: Where the course lives; the README's Colab links and every lesson's Colab cell use this URL.
REPOSITORY_URL = "https://github.com/unlearnkit/unlearnkit"

__all__ = ["ImageDataset", "Recipe", "Split", "check_split", "class_split", "comparison_table", "default_recipe", "fit",
           "get_device", "load_dataset", "make_split", "model_for", "random_split", "request_sequence",
           "seed_everything"]
