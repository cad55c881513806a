"""Training adapters under Accelerate: `train` runs a recipe in its mode, each an entry over the shared
builders (builders.py), the loop (loop.py) and the end of a run (result.py): an ensemble of seeds
(ensemble.py), self-training on unlabeled texts (self_training.py), a generation adapter
(generation.py), or a single k-shot classifier, its settings or its whole recipe chosen by
cross-validation (single.py, select.py, tiers.py)."""

from adapterlab.recipe import Recipe
from adapterlab.training.ensemble import train_ensemble
from adapterlab.training.generation import train_generation
from adapterlab.training.result import TrainResult
from adapterlab.training.self_training import train_self_training
from adapterlab.training.single import train_single

__all__ = ["TrainResult", "train"]


def train(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the adapter `recipe` describes and store it; `resume` continues the run's checkpoint."""
    recipe = recipe.with_name_pinned()  # the name and digest of the settings as given, whatever the run chooses
    if recipe.training.ensemble > 1:
        return train_ensemble(recipe, show_progress, resume)
    if recipe.training.self_train:
        return train_self_training(recipe, show_progress, resume)
    if recipe.generates:
        return train_generation(recipe, show_progress, resume)
    return train_single(recipe, show_progress, resume)
