"""Layer pruning: drop whole decoder blocks chosen by angular distance or Block Influence."""

from draftkit.prune.config import PruneConfig
from draftkit.prune.drop import drop_layers
from draftkit.prune.runner import check_prune, collect_layer_states, prune_model
from draftkit.prune.scores import angular_distance, block_distances, choose_block, lowest_influence

__all__ = [
    "PruneConfig",
    "angular_distance",
    "check_prune",
    "block_distances",
    "choose_block",
    "collect_layer_states",
    "drop_layers",
    "lowest_influence",
    "prune_model",
]
